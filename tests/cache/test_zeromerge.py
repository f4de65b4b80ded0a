"""Property tests of the compressed caches (docs/zeromerge.md, section 6) on small random tensors.

The caches are driven directly through the protocol (prefill per row, batched decode with per-row positions), or
through a generator (``test_layers_share_the_ring_pointer``), on both backends: ``torch`` (the ops' references) and
``triton`` (the kernels, run by Triton's interpreter on a CPU), in every storage dtype a backend takes (float64 for
torch only; the kernels take fp16, bf16 and fp32). An interpreted kernel costs about 0.1 s per (row, KV head) and
decode step, so the triton variants draw shorter histories and fewer of them (``examples``: counts from the Hypothesis
profile, tests/conftest.py).

Tolerances, for what a cache computes against an exact float64 reference of the same (already rounded) inputs:

- ``OUT_TOL``, attention outputs: float64 1e-6 (the scores are fp32 in every dtype, the rest is fp64); float32 1e-5
  (fp32 softmax and sums of at most a few dozen terms); bfloat16 rtol 2^-7, atol 1e-5: computed in fp32 and rounded
  once to bf16, which is off by at most half an ulp (2^-8 relative, 2^-7 leaves room for the fp32 part).
- ``MEAN_TOL``, merged keys and values (``dense_k`` / ``dense_v``, fp32 in every dtype): 1e-5. The copies the
  attention reads (``k[..., :D, :]``, ``v[..., :D, :]``) are those rounded once to the cache dtype, exactly.
- Slots holding one token, the ring included, hold that token's key and value exactly: they are moved, not computed.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from hypothesis import event, given, note
from hypothesis import strategies as st

import zmzoo
from tests.conftest import TINY, examples
from zmzoo.cache import build_caches, resolve_cache_config
from zmzoo.ops.prompt_attention import causal_attention

D = 8  # head_dim of the torch histories
TORCH_DTYPES = [torch.float64, torch.float32, torch.bfloat16]
TRITON_DTYPES = [torch.float32, torch.bfloat16]
OUT_TOL = {torch.float64: dict(rtol=1e-6, atol=1e-6), torch.float32: dict(rtol=1e-5, atol=1e-5),
           torch.bfloat16: dict(rtol=2**-7, atol=1e-5)}
MEAN_TOL = dict(rtol=1e-5, atol=1e-5)
# torch histories draw their dtype (the count stays that of the float64-only tests these were); triton ones run each
triton_dtypes = pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=lambda d: str(d).removeprefix("torch."))


@st.composite
def torch_dtypes(draw):
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    event(f"dtype {str(dtype).removeprefix('torch.')}")
    return dtype


def make_cache(method, n_heads, n_kv, batch, max_seq_len=256, head_dim=D, dtype=torch.float64, backend="torch", **kw):
    cfg = resolve_cache_config(max_seq_len=max_seq_len, method=method, **kw)
    return build_caches(cfg, n_layers=1, batch_size=batch, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
                        max_seq_len=max_seq_len, dtype=dtype, device="cpu", backend=backend)[0]


def rand_seq(gen, n_heads, n_kv, t, head_dim=D, dtype=torch.float64):
    """q (H, t, hd), k, v (Hkv, t, hd) in ``dtype`` (drawn in float64, then rounded)."""
    q = torch.randn(n_heads, t, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(n_kv, t, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(n_kv, t, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def run(cache, seqs, prompt_lens, steps):
    """Prefill row r with seqs[r][:, :prompt_lens[r]], then decode `steps` tokens for every row together.
    Returns per-step decode outputs (steps, B, H, D)."""
    outs = []
    for r, (q, k, v) in enumerate(seqs):
        t = prompt_lens[r]
        cache.prefill(q[None, :, :t], k[None, :, :t], v[None, :, :t], r)
    pos = torch.tensor(prompt_lens, dtype=torch.int64)
    for i in range(steps):
        qs = torch.stack([q[:, prompt_lens[r] + i] for r, (q, _, _) in enumerate(seqs)])[:, :, None]
        ks = torch.stack([k[:, prompt_lens[r] + i] for r, (_, k, _) in enumerate(seqs)])[:, :, None]
        vs = torch.stack([v[:, prompt_lens[r] + i] for r, (_, _, v) in enumerate(seqs)])[:, :, None]
        outs.append(cache.decode(qs, ks, vs, pos)[:, :, 0])
        pos = pos + 1
    return torch.stack(outs) if outs else torch.empty(0)


def full_attention_last(q, k, v, t):
    """Output of query t (0-based) attending to keys 0..t (full attention), q (H, T, D), k/v (Hkv, T, D), computed
    in float64 from the inputs as given."""
    q, k, v = (x[None, :, : t + 1].double() for x in (q, k, v))
    return causal_attention(q, k, v)[0, :, -1]


def ring_order(seen: int, base: int, budget: int, ring: int) -> list[tuple[int, int]]:
    """(slot, token) of the ring once a row has seen ``seen >= budget`` tokens: the R most recent tokens, the oldest
    at slot B - R + (seen - base) mod R and the others after it, wrapping (docs/zeromerge.md, section 1)."""
    return [(budget - ring + (seen - base + m) % ring, seen - ring + m) for m in range(ring)]


def same_token(got, want):
    """A slot holds a token's key or value (got, want (..., hd), one vector per KV head): exactly, or (a float64
    cache's dense region) rounded to fp32. The dense slots are kept in fp32 (``dense_k``, ``dense_v``) and the one a
    decode step picks is written back to ``k``, ``v`` (per KV head: each head picks its own), which loses nothing in
    fp32, bf16 or fp16 but rounds a float64 cache's keys there."""
    exact = (got == want).all(-1)
    if want.dtype == torch.float64:
        exact |= (got == want.float().double()).all(-1)
    return bool(exact.all())


def check_ring(cache, row, k_all, v_all, seen, prompt_len, what=""):
    """The row's slots hold the tokens fed (keys k_all, values v_all (Hkv, seen, hd)): in order while nothing was
    compressed, else the ring holds the last R in the order the pointer (derived from pos and base) says."""
    b_slots, ring = cache.budget, cache.ring
    base = max(prompt_len, b_slots)
    assert int(cache.base[row]) == base, what
    if seen < b_slots:
        for j in range(seen):
            assert same_token(cache.k[row, :, j], k_all[:, j]), f"{what} slot {j}: not token {j}'s key"
            assert same_token(cache.v[row, :, j], v_all[:, j]), f"{what} slot {j}: not token {j}'s value"
        return
    for slot, tok in ring_order(seen, base, b_slots, ring):
        assert torch.equal(cache.k[row, :, slot], k_all[:, tok]), f"{what} ring slot {slot}: not token {tok}'s key"
        assert torch.equal(cache.v[row, :, slot], v_all[:, tok]), f"{what} ring slot {slot}: not token {tok}'s value"
        assert torch.all(cache.w[row, :, slot] == 1), what


@st.composite
def cases(draw, small=False):
    """A valid cache configuration and history (no invalid draw is skipped: every one is valid by construction, and
    resolve_cache_config refusing one fails the test). ``small``: sizes for the interpreted Triton kernels."""
    method = draw(st.sampled_from(["zeromerge", "zeromerge", "h2o", "streaming", "snapkv"]))
    budget = draw(st.integers(6, 12 if small else 24))
    steps = draw(st.integers(0, 8 if small else 30))
    # small: few examples, so the first row always ends past the budget (compressed at prefill or filled decoding)
    first = st.integers(max(1, budget - steps + 1), 20) if small else st.integers(1, 40)
    c = {
        "method": method,
        "n_kv": draw(st.integers(1, 2 if small else 3)),
        "group": draw(st.sampled_from([1, 2, 3])),
        "batch": draw(st.integers(1, 2 if small else 3)),
        "head_dim": draw(st.sampled_from([16] if small else [D, 16])),
        "budget": budget,
        "steps": steps,
        "seed": draw(st.integers(0, 2**16)),
        "lens": [draw(first)] + draw(st.lists(st.integers(1, 20 if small else 40), min_size=2, max_size=2)),
    }
    if method == "streaming":
        c["kw"] = {"kv_budget": budget, "sinks": draw(st.integers(0, min(4, budget - 2)))}
        return c
    if method == "snapkv":
        c["kw"] = {"kv_budget": budget, "tail": draw(st.integers(2, min(6, budget - 1))),
                   "score_window": draw(st.sampled_from([4, 1, 32])), "score_pool": draw(st.sampled_from([3, 1, 5]))}
        return c
    dense = draw(st.integers(1, 3)) if method == "zeromerge" else 0
    kw = {"kv_budget": budget, "tail": draw(st.integers(2, min(6, budget - dense - 1))),
          "decay": draw(st.sampled_from([0.98, 0.9, 1.0])),
          "score_window": draw(st.sampled_from([None, None, 1, 4])), "score_pool": draw(st.sampled_from([None, 3]))}
    if method == "zeromerge":
        kw.update(dense=dense, metric=draw(st.sampled_from(["dot", "l2"])),
                  score_merge=draw(st.sampled_from(["max", "sum"])), logw_scale=draw(st.sampled_from([1.0, 0.6])))
    c["kw"] = kw
    return c


def check_invariants(c, backend, dtype):
    n_kv, n_heads, batch, hd, steps = c["n_kv"], c["n_kv"] * c["group"], c["batch"], c["head_dim"], c["steps"]
    gen = torch.Generator().manual_seed(c["seed"])
    lens = c["lens"][:batch]
    seqs = [rand_seq(gen, n_heads, n_kv, t + steps, hd, dtype) for t in lens]
    mk = dict(head_dim=hd, dtype=dtype, backend=backend, max_seq_len=64)
    cache = make_cache(c["method"], n_heads, n_kv, batch, **mk, **c["kw"])
    ptrs = {n: (b.data_ptr(), tuple(b.shape), b.dtype) for n, b in cache.named_buffers()}
    out = run(cache, seqs, lens, steps)
    assert {n: (b.data_ptr(), tuple(b.shape), b.dtype) for n, b in cache.named_buffers()} == ptrs
    b_slots = cache.budget
    for r in range(batch):
        seen = lens[r] + steps
        used = min(seen, b_slots)
        w = cache.w[r, :, :used]
        if c["method"] == "zeromerge":
            # mass conservation: the weights of a head's slots sum to the tokens seen (small integers: exact)
            assert torch.equal(w.sum(-1), torch.full((n_kv,), float(seen))), (r, w.sum(-1))
            assert torch.all(w[:, cache.dense:] == 1), "a slot outside the dense region holds more than one token"
        else:
            assert torch.all(w == 1)
        # the ring holds the R most recent tokens before the current one, in the order of the ring pointer
        check_ring(cache, r, seqs[r][1], seqs[r][2], seen, lens[r], f"row {r}")
    compressed = max(lens) + steps > b_slots
    event(f"{c['method']}: {'past the budget' if compressed else 'within the budget'}")
    # every row behaves as if decoded alone
    for r in range(batch):
        alone = make_cache(c["method"], n_heads, n_kv, 1, **mk, **c["kw"])
        out_r = run(alone, [seqs[r]], [lens[r]], steps)
        if steps:
            torch.testing.assert_close(out[:, r], out_r[:, 0], **OUT_TOL[dtype])
        for name in ("k", "v", "w", "s", "dense_k", "dense_v", "base"):
            tol = OUT_TOL[dtype] if name in ("k", "v") else OUT_TOL[torch.float32]
            torch.testing.assert_close(getattr(cache, name)[r], getattr(alone, name)[0], **tol)


@examples(150)
@given(dtype=torch_dtypes(), c=cases())
def test_invariants_and_row_independence(dtype, c):
    check_invariants(c, "torch", dtype)


@triton_dtypes
@examples(2)
@given(c=cases(small=True))
def test_invariants_and_row_independence_triton(dtype, c):
    check_invariants(c, "triton", dtype)


def check_full_budget(c, backend, dtype):
    """A budget covering every token seen: each decode step's output equals the full cache's and float64 full
    attention (at least one step: a history of none would compare nothing)."""
    n_kv, n_heads, batch, hd = c["n_kv"], c["n_kv"] * c["group"], c["batch"], c["head_dim"]
    steps = max(1, c["steps"])
    budget = 32 if backend == "triton" else 64
    kw = {**c["kw"], "kv_budget": budget}
    gen = torch.Generator().manual_seed(c["seed"])
    lens = [min(t, budget - steps) for t in c["lens"][:batch]]
    seqs = [rand_seq(gen, n_heads, n_kv, t + steps, hd, dtype) for t in lens]
    mk = dict(head_dim=hd, dtype=dtype, backend=backend, max_seq_len=budget)
    out = run(make_cache(c["method"], n_heads, n_kv, batch, **mk, **kw), seqs, lens, steps)
    full = run(make_cache("full", n_heads, n_kv, batch, **mk), seqs, lens, steps)
    torch.testing.assert_close(out, full, **OUT_TOL[dtype])
    for r in range(batch):
        q, k, v = seqs[r]
        for i in range(steps):
            torch.testing.assert_close(out[i, r].double(), full_attention_last(q, k, v, lens[r] + i),
                                       **OUT_TOL[dtype])


@examples(150)
@given(dtype=torch_dtypes(), c=cases())
def test_budget_covering_everything_equals_full_cache(dtype, c):
    check_full_budget(c, "torch", dtype)


@triton_dtypes
@examples(2)
@given(c=cases(small=True))
def test_budget_covering_everything_equals_full_cache_triton(dtype, c):
    check_full_budget(c, "triton", dtype)


@st.composite
def merge_cases(draw, small=False):
    """Histories that end past the budget (by construction), so tokens are merged: at prefill (t > budget) or by
    decoding once full."""
    dense = draw(st.integers(1, 3))
    tail = draw(st.integers(2, 4))
    budget = draw(st.integers(tail + dense + 1, 12 if small else 20))
    steps = draw(st.integers(1, 8 if small else 25))
    return {
        "dense": dense, "tail": tail, "budget": budget,
        "n_kv": draw(st.integers(1, 2)), "group": draw(st.sampled_from([1, 2, 3])),
        "t": draw(st.integers(max(1, budget - steps + 1), 16 if small else 40)), "steps": steps,
        "metric": draw(st.sampled_from(["dot", "l2"])), "score_merge": draw(st.sampled_from(["max", "sum"])),
        "seed": draw(st.integers(0, 1000)),
    }


def check_identical_keys(c, backend, dtype):
    """Merging tokens whose keys are equal with logw_scale=1 leaves attention equal to full attention: a slot of w
    such tokens has the logit q.k + log w, i.e. w times the mass of one, and their mean value."""
    n_kv, n_heads, t, steps, budget, dense = c["n_kv"], c["n_kv"] * c["group"], c["t"], c["steps"], c["budget"], \
        c["dense"]
    assert t + steps > budget  # merge_cases: tokens are merged (asserted below)
    hd = 16
    gen = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(n_heads, t + steps, hd, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(n_kv, 1, hd, generator=gen, dtype=torch.float64).to(dtype).expand(n_kv, t + steps, hd).contiguous()
    v = torch.randn(n_kv, t + steps, hd, generator=gen, dtype=torch.float64).to(dtype)  # values differ
    cache = make_cache("zeromerge", n_heads, n_kv, 1, head_dim=hd, dtype=dtype, backend=backend, max_seq_len=64,
                       kv_budget=budget, tail=c["tail"], dense=dense, metric=c["metric"],
                       score_merge=c["score_merge"], logw_scale=1.0)
    out = run(cache, [(q, k, v)], [t], steps)
    # a merge happened: the dense slots of every head stand for more tokens than they have slots
    merged = cache.w[0, :, :dense].sum(-1)
    note(f"tokens in the dense slots per head: {merged.tolist()} (dense={dense})")
    assert torch.all(merged > dense)
    tol = OUT_TOL[dtype] if dtype != torch.bfloat16 else dict(rtol=2**-7, atol=2**-8)  # + the mean values' rounding
    for i in range(steps):
        torch.testing.assert_close(out[i, 0].double(), full_attention_last(q, k, v, t + i), **tol)


@examples(40)
@given(dtype=torch_dtypes(), c=merge_cases())
def test_identical_keys_merge_exactly(dtype, c):
    check_identical_keys(c, "torch", dtype)


@triton_dtypes
@examples(2)
@given(c=merge_cases(small=True))
def test_identical_keys_merge_exactly_triton(dtype, c):
    check_identical_keys(c, "triton", dtype)


def check_weighted_means(c, backend, dtype):
    """Track provenance with one-hot values (head_dim = tokens): at every step a slot's value is exactly the mean of
    the tokens merged into it, every token seen is in exactly one slot, the fp32 dense slots hold the weighted means
    of their tokens' keys and values, the copies the attention reads are those rounded once, and every other slot
    holds one token's key and value exactly."""
    t, steps, budget, dense, n_kv = c["t"], c["steps"], c["budget"], c["dense"], c["n_kv"]
    assert t + steps > budget  # merge_cases: tokens are merged (asserted below)
    n = t + steps
    n_heads = n_kv * c["group"]
    gen = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(n_heads, n, n, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(n_kv, n, n, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.eye(n, dtype=torch.float64).expand(n_kv, n, n).to(dtype)  # value of token i: one-hot i
    cache = make_cache("zeromerge", n_heads, n_kv, 1, head_dim=n, dtype=dtype, backend=backend, max_seq_len=128,
                       kv_budget=budget, tail=c["tail"], dense=dense, metric=c["metric"],
                       score_merge=c["score_merge"])
    cache.prefill(q[None, :, :t], k[None, :, :t], v[None, :, :t], 0)
    for i in range(steps + 1):
        if i:
            p = t + i - 1
            cache.decode(q[None, :, p, None], k[None, :, p, None], v[None, :, p, None], torch.tensor([p]))
        seen = t + i
        used = min(seen, budget)
        for h in range(n_kv):
            w = cache.w[0, h, :used]
            vals = torch.cat([cache.dense_v[0, h, : min(dense, used)], cache.v[0, h, dense:used].float()])
            coverage = torch.zeros(n, dtype=torch.int64)
            for j in range(used):
                toks = torch.nonzero(vals[j] > 0).flatten()
                assert len(toks) == int(w[j]), (h, j, toks, w[j])
                coverage[toks] += 1
                if j >= dense:  # one token, moved not computed
                    assert len(toks) == 1
                    assert same_token(cache.k[0, h, j], k[h, toks[0]]) and same_token(cache.v[0, h, j], v[h, toks[0]])
                    continue
                # the fp32 dense slot: the mean of exactly its tokens
                torch.testing.assert_close(cache.dense_v[0, h, j].double(), v[h, toks].double().mean(0), **MEAN_TOL)
                torch.testing.assert_close(cache.dense_k[0, h, j].double(), k[h, toks].double().mean(0), **MEAN_TOL)
            assert torch.all(coverage[:seen] == 1) and torch.all(coverage[seen:] == 0), coverage
            # the attention reads the dense slots rounded once to the cache dtype (a float64 cache: the fp32 values,
            # or a prompt's own keys until the first decode step writes the dense slots back)
            nd = min(dense, used)
            for got, want in ((cache.k[0, h, :nd], cache.dense_k[0, h, :nd]),
                              (cache.v[0, h, :nd], cache.dense_v[0, h, :nd])):
                if dtype == torch.float64:
                    torch.testing.assert_close(got, want.double(), **MEAN_TOL)
                else:
                    assert torch.equal(got, want.to(dtype))
    merged = cache.w[0, :, :dense].sum(-1)
    note(f"tokens in the dense slots per head: {merged.tolist()} (dense={dense})")
    assert torch.all(merged > dense)  # a merge happened


@examples(15)
@given(dtype=torch_dtypes(), c=merge_cases())
def test_merged_slot_is_weighted_mean_of_its_tokens(dtype, c):
    check_weighted_means(c, "torch", dtype)


@triton_dtypes
@examples(2)
@given(c=merge_cases(small=True))
def test_merged_slot_is_weighted_mean_of_its_tokens_triton(dtype, c):
    check_weighted_means(c, "triton", dtype)


@functools.cache
def tiny_model(n_layers: int, n_kv: int, dtype: torch.dtype, backend: str):
    """A random tiny llama (dim 64, 4 query heads of 16) with a full cache; examples take caches of their own on its
    weights (``with_cache``)."""
    overrides = {**TINY, "max_position_embeddings": 256, "n_layers": n_layers, "n_kv_heads": n_kv}
    return zmzoo.load("llama2-7b", weights="random", args_overrides=overrides, device="cpu", dtype=dtype,
                      compile=False, max_seq_len=96, ops=backend, seed=n_layers, verbose=False)


@st.composite
def layer_cases(draw, small=False):
    method = draw(st.sampled_from(["zeromerge", "zeromerge", "h2o"]))
    dense = draw(st.integers(1, 3)) if method == "zeromerge" else 0
    budget = draw(st.integers(dense + 3, 12 if small else 24))
    n_rows = draw(st.integers(1, 2 if small else 3))
    steps = draw(st.integers(1, 3 if small else 20))
    # small: the first prompt always ends past the budget
    lens = [draw(st.integers(max(1, budget - steps + 1), 16) if small else st.integers(1, 40))]
    lens += draw(st.lists(st.integers(1, 16 if small else 40), min_size=n_rows - 1, max_size=n_rows - 1))
    kw = {"kv_budget": budget, "tail": draw(st.integers(2, min(6, budget - dense - 1))),
          "score_window": draw(st.sampled_from([None, None, 4])), "score_pool": draw(st.sampled_from([None, 3]))}
    if method == "zeromerge":
        kw.update(dense=dense, metric=draw(st.sampled_from(["dot", "l2"])),
                  score_merge=draw(st.sampled_from(["max", "sum"])))
    return {
        "method": method, "kw": kw, "budget": budget,
        "n_layers": 2 if small else draw(st.integers(2, 3)), "n_kv": draw(st.sampled_from([1, 2])),
        "prompts": [draw(st.lists(st.integers(0, 127), min_size=n, max_size=n)) for n in lens],
        "steps": steps,
    }


def check_layers_share_the_ring_pointer(c, backend, dtype):
    """A generator's layers share one ring pointer per row, derived from pos and base (no pointer is stored): after a
    prefill and decode steps, every layer's ring holds the keys and values of the R most recent tokens fed to that
    layer, the oldest at B - R + (pos - base) mod R, and every layer's weights sum to the tokens fed (zeromerge) or
    kept (h2o), per head."""
    prompts, steps = c["prompts"], c["steps"]
    gen = tiny_model(c["n_layers"], c["n_kv"], dtype, backend).with_cache(c["method"], max_batch_size=len(prompts),
                                                                           **c["kw"])
    fed = [[[] for _ in prompts] for _ in gen.model.caches]  # per layer and row: the (k, v) fed, in order

    def capture(layer, cache):
        prefill, decode = cache.prefill, cache.decode

        def on_prefill(q, k, v, row):
            fed[layer][row].append((k[0].clone(), v[0].clone()))
            return prefill(q, k, v, row)

        def on_decode(q, k, v, pos):
            for r in range(len(prompts)):
                fed[layer][r].append((k[r].clone(), v[r].clone()))
            return decode(q, k, v, pos)

        cache.prefill, cache.decode = on_prefill, on_decode

    for layer, cache in enumerate(gen.model.caches):
        capture(layer, cache)
    gen.generate(prompts, max_new_tokens=steps + 1)  # feeds `steps` generated tokens back
    pointers = set()
    for layer, cache in enumerate(gen.model.caches):
        for r, prompt in enumerate(prompts):
            k_all = torch.cat([k for k, _ in fed[layer][r]], dim=1)  # (Hkv, T + steps, hd)
            v_all = torch.cat([v for _, v in fed[layer][r]], dim=1)
            seen = len(prompt) + steps
            assert k_all.shape[1] == seen
            mass = seen if c["method"] == "zeromerge" else min(seen, c["budget"])  # h2o drops a token per step
            assert torch.equal(cache.w[r].sum(-1), torch.full((c["n_kv"],), float(mass))), (layer, r)
            check_ring(cache, r, k_all, v_all, seen, len(prompt), f"layer {layer} row {r}")
            pointers.add((r, (seen - int(cache.base[r])) % cache.ring))
    assert len(pointers) == len(prompts)  # one ring pointer per row, whatever the layer
    event(f"{c['method']}: " + ("past the budget" if max(map(len, prompts)) + steps > c["budget"] else
                                "within the budget"))


@examples(12)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16]), c=layer_cases())
def test_layers_share_the_ring_pointer(dtype, c):
    check_layers_share_the_ring_pointer(c, "torch", dtype)


@triton_dtypes
@examples(2)
@given(c=layer_cases(small=True))
def test_layers_share_the_ring_pointer_triton(dtype, c):
    check_layers_share_the_ring_pointer(c, "triton", dtype)


def score_window_of(decay: float) -> int:
    """W of docs/zeromerge.md, section 3, before it is capped at T: ceil(ln(1e-9) / ln(decay)) + 1."""
    return math.ceil(math.log(1e-9) / math.log(decay)) + 1


@st.composite
def long_prompts(draw, small=False):
    """Prompts past the scoring window W: of decays 0.8, 0.7, 0.5 (W = 94, 60, 31), and (torch) of the default 0.98
    (W = 1027: prompts of 1028 to 1087 tokens)."""
    decay = draw(st.sampled_from([0.8, 0.7, 0.5] if small else [0.8, 0.7, 0.5, 0.98]))
    w = score_window_of(decay)
    t = draw(st.integers(w + 1, w + (24 if small else 60)))  # longer than the scoring window
    dense = draw(st.integers(1, 3))
    return {
        "decay": decay, "t": t, "n_kv": draw(st.integers(1, 2)), "group": draw(st.sampled_from([1, 2, 3])),
        "head_dim": draw(st.sampled_from([16] if small else [D, 16])),
        "budget": draw(st.integers(max(t - 40, dense + 7), t + 8)), "dense": dense, "tail": 4,
        "score_window": draw(st.sampled_from([None, None, None, 1, 40])), "row": draw(st.integers(0, 1)),
        "seed": draw(st.integers(0, 2**16)),
    }


def exact_prompt_scores(q, k, decay, window):
    """(Hkv, T) float64: s_j = sum over every query i >= j of decay^(T-1-i) * sum over the group of p(i, j); with a
    ``window``, over the last ``window`` queries undecayed."""
    q, k = q.double(), k.double()
    n_kv, t, hd = k.shape
    g = q.shape[0] // n_kv
    logits = torch.einsum("hgid,hjd->hgij", q.view(n_kv, g, t, hd), k) / math.sqrt(hd)
    p = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf")).softmax(-1)
    wts = decay ** (t - 1 - torch.arange(t, dtype=torch.float64))
    if window is not None:
        wts = (torch.arange(t) >= t - window).double()
    return torch.einsum("hgij,i->hj", p, wts)


def check_scores_past_the_window(c, backend, dtype):
    """The prompt scores of a prompt longer than the scoring window W (decay < 1: the last W queries only) equal the
    exact decayed sum over all its queries, to the bound docs/zeromerge.md states for the queries left out
    (G * decay^W / (1 - decay)) plus arithmetic: all of them where the prompt fits, the kept slots' where it is
    compressed (and the kept tokens are a top selection of the exact scores). With ``score_window`` the scores are the
    undecayed sum of the last N queries, exactly."""
    t, n_kv, hd, decay, win = c["t"], c["n_kv"], c["head_dim"], c["decay"], c["score_window"]
    n_heads = n_kv * c["group"]
    gen = torch.Generator().manual_seed(c["seed"])
    q, k, v = rand_seq(gen, n_heads, n_kv, t, hd, dtype)
    cache = make_cache("zeromerge", n_heads, n_kv, 2, head_dim=hd, dtype=dtype, backend=backend, max_seq_len=t + 8,
                       kv_budget=c["budget"], tail=c["tail"], dense=c["dense"], decay=decay, score_window=win)
    cache.prefill(q[None], k[None], v[None], c["row"])
    want = exact_prompt_scores(q, k, decay, win)
    left_out = 0.0 if win is not None else c["group"] * decay ** score_window_of(decay) / (1 - decay)
    # bf16: the CPU flash kernel's log-sum-exp, which the scoring reuses, is off by up to 2^-13.8 (measured over random
    # prompts; test_oracle_agreement.PREFILL_REL); the rest is fp32 sums
    rtol, atol = (2**-12, 5e-6) if dtype == torch.bfloat16 else (1e-5, 1e-6)
    tol = dict(rtol=rtol, atol=atol + left_out)
    s, b = cache.s[c["row"]].double(), cache.budget
    event(f"decay {decay} (W = {score_window_of(decay)}), " + ("the prompt fits" if t <= b else "compressed"))
    if t <= b:
        torch.testing.assert_close(s[:, :t], want, **tol)
        return
    dense = cache.dense
    for h in range(n_kv):
        # the tokens the kept slots hold, found by their keys (random keys: all distinct)
        match = (cache.k[c["row"], h, dense:, None, :] == k[h, None, :, :]).all(-1)  # (B - D, T)
        assert torch.all(match.sum(-1) == 1)
        pos = match.int().argmax(-1)
        torch.testing.assert_close(s[h, dense:], want[h, pos], **tol)
        kept = torch.zeros(t, dtype=torch.bool)
        kept[pos] = True
        kept[t - c["tail"]:] = False  # the tail is kept whatever its scores
        dropped = ~kept
        dropped[t - c["tail"]:] = False
        # a top selection of the exact scores, up to the tolerance
        slack = atol + left_out + rtol * float(want[h].max())
        assert float(want[h, kept].min()) >= float(want[h, dropped].max()) - slack


@examples(60)
@given(dtype=torch_dtypes(), c=long_prompts())
def test_prompt_scores_past_the_window(dtype, c):
    check_scores_past_the_window(c, "torch", dtype)


@triton_dtypes
@examples(3)
@given(c=long_prompts(small=True))
def test_prompt_scores_past_the_window_triton(dtype, c):
    check_scores_past_the_window(c, "triton", dtype)


def test_settings_validation_messages():
    with pytest.raises(ValueError, match="must exceed tail"):
        resolve_cache_config(max_seq_len=100, kv_budget=10, tail=8, dense=2)
    with pytest.raises(ValueError, match="kv_ratio"):
        resolve_cache_config(max_seq_len=100, kv_ratio=1.5)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        resolve_cache_config(max_seq_len=100, kv_budget=200)
    with pytest.raises(TypeError, match="metric"):
        resolve_cache_config(max_seq_len=100, method="streaming", kv_budget=20, metric="dot")
    with pytest.raises(ValueError, match="metric"):
        resolve_cache_config(max_seq_len=100, kv_budget=20, metric="cos")
    with pytest.raises(ValueError, match="not both"):
        resolve_cache_config(max_seq_len=100, kv_budget=20, kv_ratio=0.1)
    with pytest.raises(ValueError, match="do not apply"):
        resolve_cache_config(max_seq_len=100, method="full", kv_budget=20)
    with pytest.raises(ValueError, match="decay"):
        resolve_cache_config(max_seq_len=100, kv_budget=20, decay=1.5)
    with pytest.raises(ValueError, match="method="):
        resolve_cache_config(max_seq_len=100, method="lru", kv_budget=20)
    with pytest.raises(ValueError, match="whole number"):
        resolve_cache_config(max_seq_len=100, kv_budget=20, tail=2.5)


def test_ratio_rounding_matches_zeromerge_md():
    # B = floor(ratio * max_seq_len), tail = max(2, floor(tail * B)), D = max(1, floor(dense * (B - tail)))
    c = resolve_cache_config(max_seq_len=40960, kv_ratio=0.05)
    assert (c.budget, c.tail, c.dense) == (2048, 204, 1)
    c = resolve_cache_config(max_seq_len=4096, kv_ratio=0.05, tail=0.5, dense=0.02)
    assert (c.budget, c.tail, c.dense) == (math.floor(0.05 * 4096), 102, 2)
    c = resolve_cache_config(max_seq_len=1000, kv_ratio=0.011, tail=0.1)
    assert (c.budget, c.tail, c.dense) == (11, 2, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("score_merge", ["max", "sum"])
@pytest.mark.parametrize("n_chunks,block", [(1, 7), (5, 16), (3, 4096), (1, None), (4, None)])
def test_chunk_sums_equal_scatter_reference(dtype, score_merge, n_chunks, block):
    """The dense slots' blocked one-hot sums equal fp32/fp64 scatter sums over the same chunk ids (several blocks,
    positions left out of every chunk, odd sizes); so does the loop-free form (``block=None``, the compiled
    rescore's)."""
    from zmzoo.cache.zeromerge import chunk_of_rank, chunk_sums

    g = torch.Generator().manual_seed(n_chunks)
    n_kv, t, d = 3, 101, 6
    k = torch.randn(n_kv, t, d, generator=g).to(dtype)
    v = torch.randn(n_kv, t, d, generator=g).to(dtype)
    s = torch.rand(n_kv, t, generator=g)
    free = torch.rand(n_kv, t, generator=g) < 0.7
    free[:, :n_chunks] = True
    n = int(free.sum(1).min())
    free &= free.cumsum(1) <= n  # the same number of free positions in every head
    cid = torch.where(free, chunk_of_rank(free.cumsum(1) - 1, n, n_chunks), n_chunks)
    kd, vd, sd = chunk_sums(k, v, s, cid, n_chunks, score_merge, block=block)
    idx = cid.clamp(max=n_chunks)
    want_k = torch.zeros(n_kv, n_chunks + 1, d, dtype=torch.float64).scatter_add_(
        1, idx.unsqueeze(-1).expand(-1, -1, d), k.double())[:, :n_chunks]
    want_v = torch.zeros(n_kv, n_chunks + 1, d, dtype=torch.float64).scatter_add_(
        1, idx.unsqueeze(-1).expand(-1, -1, d), v.double())[:, :n_chunks]
    red = "amax" if score_merge == "max" else "sum"
    init = float("-inf") if score_merge == "max" else 0.0
    want_s = torch.full((n_kv, n_chunks + 1), init).scatter_reduce(1, idx, s, reduce=red)[:, :n_chunks]
    torch.testing.assert_close(kd.double(), want_k, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(vd.double(), want_v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sd, want_s, rtol=1e-6, atol=1e-6)

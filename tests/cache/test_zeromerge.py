"""Property tests of the compressed caches (ZEROMERGE.md "Invariants worth testing") on small random tensors.

The caches are driven directly through the protocol (prefill per row, batched decode with per-row positions).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmzoo.cache import build_caches, resolve_cache_config
from zmzoo.ops.prompt_attention import causal_attention

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
D = 8


def make_cache(method, n_heads, n_kv, batch, max_seq_len=256, head_dim=D, **kw):
    cfg = resolve_cache_config(max_seq_len=max_seq_len, method=method, **kw)
    return build_caches(cfg, n_layers=1, batch_size=batch, n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim,
                        max_seq_len=max_seq_len, dtype=torch.float64, device="cpu")[0]


def rand_seq(gen, n_heads, n_kv, t):
    q = torch.randn(n_heads, t, D, generator=gen, dtype=torch.float64)
    k = torch.randn(n_kv, t, D, generator=gen, dtype=torch.float64)
    v = torch.randn(n_kv, t, D, generator=gen, dtype=torch.float64)
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
    """Output of query t (0-based) attending to keys 0..t (full attention), q (H, T, D), k/v (Hkv, T, D)."""
    return causal_attention(q[None, :, : t + 1], k[None, :, : t + 1], v[None, :, : t + 1])[0, :, -1]


cases = st.fixed_dictionaries({
    "method": st.sampled_from(["zeromerge", "h2o", "streaming", "snapkv"]),
    "n_kv": st.integers(1, 3),
    "group": st.sampled_from([1, 2, 3]),
    "batch": st.integers(1, 3),
    "budget": st.integers(6, 24),
    "tail": st.integers(2, 6),
    "dense": st.integers(1, 3),
    "metric": st.sampled_from(["dot", "l2"]),
    "score_merge": st.sampled_from(["max", "sum"]),
    "decay": st.sampled_from([0.98, 0.9, 1.0]),
    "logw_scale": st.sampled_from([1.0, 0.6]),
    "steps": st.integers(0, 30),
    "seed": st.integers(0, 2**16),
    "lens": st.lists(st.integers(1, 40), min_size=3, max_size=3),
})


def cache_kw(c):
    m = c["method"]
    if m == "streaming":
        return {"kv_budget": c["budget"], "sinks": min(4, c["budget"] - 2)}
    if m == "zeromerge":
        tail = min(c["tail"], c["budget"] - c["dense"] - 1)
        return {"kv_budget": c["budget"], "tail": max(tail, 2), "dense": c["dense"], "metric": c["metric"],
                "score_merge": c["score_merge"], "decay": c["decay"], "logw_scale": c["logw_scale"]}
    if m == "h2o":
        return {"kv_budget": c["budget"], "tail": min(c["tail"], c["budget"] - 1), "decay": c["decay"]}
    return {"kv_budget": c["budget"], "tail": min(c["tail"], c["budget"] - 1), "score_window": 4, "score_pool": 3}


def valid_case(c):
    kw = cache_kw(c)
    try:
        resolve_cache_config(max_seq_len=256, method=c["method"], **kw)
    except ValueError:
        return False
    return True


@SETTINGS
@given(cases)
def test_invariants_and_row_independence(c):
    if not valid_case(c):
        return
    n_kv, n_heads, batch = c["n_kv"], c["n_kv"] * c["group"], c["batch"]
    gen = torch.Generator().manual_seed(c["seed"])
    lens = c["lens"][:batch]
    seqs = [rand_seq(gen, n_heads, n_kv, t + c["steps"]) for t in lens]
    cache = make_cache(c["method"], n_heads, n_kv, batch, **cache_kw(c))
    ptrs = {n: (b.data_ptr(), tuple(b.shape)) for n, b in cache.named_buffers()}
    out = run(cache, seqs, lens, c["steps"])
    assert {n: (b.data_ptr(), tuple(b.shape)) for n, b in cache.named_buffers()} == ptrs
    b_slots, ring = cache.budget, cache.ring
    for r in range(batch):
        seen = lens[r] + c["steps"]
        used = min(seen, b_slots)
        w = cache.w[r, :, :used]
        if c["method"] == "zeromerge":
            # mass conservation: the weights of a head's slots sum to the tokens seen
            torch.testing.assert_close(w.sum(-1), torch.full((n_kv,), float(seen), dtype=torch.float32))
        else:
            assert torch.all(w == 1)
        _, k_all, v_all = seqs[r]
        if seen > b_slots:
            # the ring holds the R most recent tokens before the current one (as a set, per head)
            recent = k_all[:, seen - ring : seen]
            ring_k = cache.k[r, :, b_slots - ring :]
            for h in range(n_kv):
                d = torch.cdist(ring_k[h], recent[h])
                assert torch.all(d.min(dim=1).values < 1e-12), "ring slot not one of the most recent tokens"
                assert torch.all(d.min(dim=0).values < 1e-12), "a recent token is missing from the ring"
        else:
            # no compression: slots hold the tokens in order
            torch.testing.assert_close(cache.k[r, :, :used], k_all[:, :used])
    # every row behaves as if decoded alone
    for r in range(batch):
        alone = make_cache(c["method"], n_heads, n_kv, 1, **cache_kw(c))
        out_r = run(alone, [seqs[r]], [lens[r]], c["steps"])
        if c["steps"]:
            torch.testing.assert_close(out[:, r], out_r[:, 0], rtol=1e-6, atol=1e-6)
        for name in ("k", "v", "w", "s"):
            torch.testing.assert_close(getattr(cache, name)[r], getattr(alone, name)[0], rtol=1e-6, atol=1e-6)


@SETTINGS
@given(cases)
def test_budget_covering_everything_equals_full_cache(c):
    c = {**c, "budget": 64}
    if not valid_case(c):
        return
    n_kv, n_heads, batch = c["n_kv"], c["n_kv"] * c["group"], c["batch"]
    gen = torch.Generator().manual_seed(c["seed"])
    lens = [min(t, 64 - c["steps"]) for t in c["lens"][:batch]]
    seqs = [rand_seq(gen, n_heads, n_kv, t + c["steps"]) for t in lens]
    out = run(make_cache(c["method"], n_heads, n_kv, batch, **cache_kw(c)), seqs, lens, c["steps"])
    full = run(make_cache("full", n_heads, n_kv, batch), seqs, lens, c["steps"])
    if c["steps"]:
        torch.testing.assert_close(out, full, rtol=1e-6, atol=1e-6)
    for r in range(batch):
        q, k, v = seqs[r]
        for i in range(c["steps"]):
            torch.testing.assert_close(out[i, r], full_attention_last(q, k, v, lens[r] + i), rtol=1e-6, atol=1e-6)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(6, 20), st.integers(1, 3), st.integers(1, 3), st.integers(1, 40), st.integers(1, 25),
       st.integers(0, 1000))
def test_identical_tokens_merge_exactly(budget, dense, group, t, steps, seed):
    """Merging identical keys/values with logw_scale=1 leaves attention equal to full attention."""
    n_kv, n_heads = 2, 2 * group
    tail = 2
    if budget <= tail + dense:
        return
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(n_heads, t + steps, D, generator=gen, dtype=torch.float64)
    k = torch.randn(n_kv, 1, D, generator=gen, dtype=torch.float64).expand(n_kv, t + steps, D).contiguous()
    v = torch.randn(n_kv, 1, D, generator=gen, dtype=torch.float64).expand(n_kv, t + steps, D).contiguous()
    cache = make_cache("zeromerge", n_heads, n_kv, 1, kv_budget=budget, tail=tail, dense=dense, logw_scale=1.0)
    out = run(cache, [(q, k, v)], [t], steps)
    for i in range(steps):
        torch.testing.assert_close(out[i, 0], full_attention_last(q, k, v, t + i), rtol=1e-6, atol=1e-6)


def test_merged_slot_is_weighted_mean_of_its_tokens():
    """Track provenance with one-hot values: a slot's value is exactly the mean of the tokens merged into it."""
    t, steps, budget = 30, 40, 10
    n = t + steps
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, n, n, generator=gen, dtype=torch.float64)
    k = torch.randn(1, n, n, generator=gen, dtype=torch.float64)
    cache = make_cache("zeromerge", 2, 1, 1, kv_budget=budget, tail=3, dense=2, max_seq_len=128, head_dim=n)
    # values = one-hot token ids (head_dim = n) so every slot's value reveals which tokens it averages
    v = torch.eye(n, dtype=torch.float64)[None]
    cache.prefill(q[None, :, :t], k[None, :, :t], v[None, :, :t], 0)
    for i in range(steps):
        p = torch.tensor([t + i])
        cache.decode(q[None, :, t + i, None], k[None, :, t + i, None], v[None, :, t + i, None], p)
        vals, w = cache.v[0, 0], cache.w[0, 0]
        # each slot: entries equal 1/w on exactly w tokens, zero elsewhere; all tokens seen covered once
        for j in range(budget):
            nz = vals[j] > 0
            assert int(nz.sum()) == int(w[j])
            torch.testing.assert_close(vals[j][nz], torch.full((int(w[j]),), 1 / float(w[j]), dtype=torch.float64))
        coverage = (vals > 0).sum(0)
        assert torch.all(coverage[: t + i + 1] == 1) and torch.all(coverage[t + i + 1 :] == 0)
        # merged keys are the same weighted means (k averaged with the same tokens)
        for j in range(budget):
            toks = torch.nonzero(vals[j] > 0).flatten()
            torch.testing.assert_close(cache.k[0, 0, j], k[0, toks].mean(0), rtol=1e-6, atol=1e-6)


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
@pytest.mark.parametrize("n_chunks,block", [(1, 7), (5, 16), (3, 4096)])
def test_chunk_sums_equal_scatter_reference(dtype, score_merge, n_chunks, block):
    """The dense slots' blocked one-hot sums equal fp32/fp64 scatter sums over the same chunk ids (several blocks,
    positions left out of every chunk, odd sizes)."""
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

"""ZeroMerge's lookahead (the ``retrieval`` preset): the prompt is compressed again with the scores a greedy draft adds.

Reference, computed independently of the cache's rescoring path: the draft is plain ZeroMerge's greedy continuation of
the prompt (the cache as the first, plain pass leaves it, which is what the model drafts through); one causal pass of
a full cache over prompt + draft gives every layer's queries and keys; each draft query's group-summed softmax over
the keys before it is folded into the prompt's decayed scores as a decode step would (``s = decay * s + p``);
``select`` of those scores is the expected cache.
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch
from hypothesis import event, example, given
from hypothesis import strategies as st

import zmzoo
from tests.conftest import TINY, examples
from zmzoo.cache.base import KVCache
from zmzoo.cache.full import FullCache

from .oracle import ZeroMergeOracle

SMALL = {**TINY, "max_position_embeddings": 256}


def gen(method="full", **kw):
    return zmzoo.load("llama2-7b", weights="random", args_overrides=SMALL, device="cpu", dtype=torch.float32,
                      compile=False, max_seq_len=128, method=method, seed=3, verbose=False, **kw)


def assert_caches_match(eager, comp, names, t):
    """Every layer's cache buffers ``names`` of two Generators: the weights and ring base equal, the rest within
    fp32 tolerance (the compiled rescore sums in another order)."""
    for layer, (a, b) in enumerate(zip(eager.model.caches, comp.model.caches)):
        for name in names:
            want, got = getattr(a, name), getattr(b, name)
            if name in ("w", "base"):
                assert torch.equal(got, want), (t, layer, name)
            else:
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"t={t} layer {layer} {name}")


@pytest.mark.parametrize("n,pool,weight", [(5, None, 1.0), (9, 3, 0.25), (1, None, 0.0)])
def test_lookahead_selection_matches_reference(n, pool, weight):
    prompt = [int(x) for x in torch.randint(1, 128, (45,), generator=torch.Generator().manual_seed(1))]
    budget = 14
    zm = gen("zeromerge", kv_budget=budget, lookahead=n, score_pool=pool, lookahead_prompt_weight=weight)
    zm.prefill([prompt])
    # the draft: plain ZeroMerge's greedy continuation (no stop at EOS, as the model's draft)
    draft = gen("zeromerge", kv_budget=budget, score_pool=pool).generate(prompt, max_new_tokens=n, return_ids=True)
    assert len(draft) == n

    full = gen()
    captured = []

    def capture(self, q, k, v, row, _orig=FullCache.prefill):
        captured.append((q.clone(), k.clone(), v.clone()))
        return _orig(self, q, k, v, row)

    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(FullCache, "prefill", capture)
        full.model.prefill(torch.tensor([prompt + draft]), row=0)  # draft token i is fed at position T + i
    t = len(prompt)
    for layer, (cache, (q, k, v)) in enumerate(zip(zm.model.caches, captured)):
        n_kv, g = k.shape[1], q.shape[1] // k.shape[1]
        s = cache.prompt_scores(q[:, :, :t], k[:, :, :t]) * weight
        for i in range(n):
            j = t + i  # draft token i sits at position T + i and sees positions <= T + i
            logits = torch.einsum("hgd,hsd->hgs", q[0, :, j].view(n_kv, g, -1), k[0, :, : j + 1]) / math.sqrt(
                q.shape[-1])
            s = cache.decay * s + logits.softmax(-1)[..., :t].sum(1)
        kk, vv, ww, ss = cache.select(k[0, :, :t], v[0, :, :t], s)
        torch.testing.assert_close(cache.k[0], kk, rtol=1e-5, atol=1e-5, msg=f"layer {layer} keys")
        torch.testing.assert_close(cache.v[0], vv, rtol=1e-5, atol=1e-5, msg=f"layer {layer} values")
        torch.testing.assert_close(cache.w[0], ww, msg=f"layer {layer} weights")
        torch.testing.assert_close(cache.s[0], ss, rtol=1e-4, atol=1e-6, msg=f"layer {layer} scores")
        assert cache.draft_request() == {}
    assert int(zm.pos[0]) == t  # the draft left no trace: decoding starts at the prompt's end


def test_lookahead_leaves_no_trace_when_the_prompt_fits():
    """A prompt within the budget is not compressed: no draft runs and decoding equals plain ZeroMerge (teacher-forced
    logits equal, greedy tokens too)."""
    prompt = list(range(3, 13))
    a = gen("zeromerge", kv_budget=20, lookahead=8)
    b = gen("zeromerge", kv_budget=20)
    assert a.generate(prompt, max_new_tokens=30, return_ids=True) == b.generate(prompt, max_new_tokens=30,
                                                                                  return_ids=True)


def test_retrieval_preset_resolves_and_is_overridable():
    from zmzoo.cache import PRESETS, resolve_cache_config

    cfg = resolve_cache_config(max_seq_len=1000, kv_ratio=0.1, preset="retrieval")
    assert cfg.lookahead == PRESETS["retrieval"]["lookahead"] > 0 and cfg.method == "zeromerge"
    assert cfg.lookahead_greedy == PRESETS["retrieval"]["lookahead_greedy"] > 0
    assert cfg.lookahead_pin == 0  # measured, not part of the preset (docs/retrieval.md)
    pinned = resolve_cache_config(max_seq_len=1000, kv_ratio=0.1, preset="retrieval", lookahead_pin=0.5,
                                  lookahead_pin_extend=16, lookahead_pin_spans=4)
    assert (pinned.lookahead_pin, pinned.lookahead_pin_extend, pinned.lookahead_pin_spans) == (0.5, 16, 4)
    assert pinned.cache_kwargs()["lookahead_pin"] == 0.5
    for bad in (dict(lookahead_pin=1.5), dict(lookahead_pin_extend=-1), dict(lookahead_pin_spans=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            resolve_cache_config(max_seq_len=1000, kv_ratio=0.1, preset="retrieval", **bad)
    assert pinned.lookahead_pin_copied is True
    ext = resolve_cache_config(max_seq_len=1000, kv_ratio=0.1, preset="retrieval", lookahead_pin_copied=False)
    assert ext.cache_kwargs()["lookahead_pin_copied"] is False
    with pytest.raises(TypeError, match="lookahead_pin_copied"):
        resolve_cache_config(max_seq_len=1000, kv_ratio=0.1, preset="retrieval", lookahead_pin_copied=0)
    assert resolve_cache_config(max_seq_len=1000, kv_ratio=0.1, preset="retrieval", lookahead=64).lookahead == 64
    with pytest.raises(ValueError, match="lookahead_greedy"):  # the preset's 8 greedy tokens exceed a 3-token draft
        resolve_cache_config(max_seq_len=1000, kv_ratio=0.1, preset="retrieval", lookahead=3)
    assert resolve_cache_config(max_seq_len=1000, kv_ratio=0.1, preset="retrieval", lookahead=3,
                                lookahead_greedy=0).lookahead == 3
    with pytest.raises(ValueError, match="lookahead"):
        resolve_cache_config(max_seq_len=1000, kv_ratio=0.1, lookahead=-1)
    with pytest.raises(TypeError, match="lookahead"):
        resolve_cache_config(max_seq_len=1000, kv_ratio=0.1, method="h2o", lookahead=4)


def test_retrieval_preset_mass_and_batch_rows():
    """Every row keeps its own prompt's mass after the draft; a row computes in a batch what it computes alone
    (teacher-forced logits, greedy tokens up to the first near-tie): the draft of one row leaves the others alone."""
    from tests.conftest import SingleRuns, assert_same_function

    prompts = [list(range(5, 60)), [9, 8, 7] * 12, list(range(1, 9))]
    single = SingleRuns(gen("zeromerge", kv_budget=16, preset="retrieval"))
    g = zmzoo.load("llama2-7b", weights="random", args_overrides=SMALL, device="cpu", dtype=torch.float32,
                   compile=False, max_seq_len=128, method="zeromerge", kv_budget=16, preset="retrieval", seed=3,
                   max_batch_size=3, verbose=False)
    assert_same_function(single, g, prompts, 20, rtol=1e-5, atol=1e-5)
    g.generate(prompts, max_new_tokens=20)
    caches: list[KVCache] = g.model.caches
    for c in caches:
        # 19 of the 20 new tokens were fed back; each row's weights sum to its prompt + 19
        torch.testing.assert_close(c.w.sum(-1), torch.tensor([[74.0] * 2, [55.0] * 2, [27.0] * 2]))


# ---------------------------------------------------------------------------------------------- property tests
# Generated prompts, budgets and lookahead settings through a generator (prefill, draft, rescore), both backends, fp32
# and bf16. The reference is computed apart from the cache's code: the prompt's and the draft's q, k, v come from a
# full cache's prefill of prompt + draft, the scores from a float64 softmax, the selection from the oracle
# (tests/cache/oracle.py, ``select_prompt``), the expected draft from plain ZeroMerge's greedy continuation and
# ``lookup_ref`` below. The cache's top-k must be a top selection of the reference scores within their tolerance (fp32
# 1e-4 relative; bf16 1e-3: the layers' outputs are rounded to bf16, the second layer's q and k with them); where a
# near-tie let it take the other side, the reference selects what it kept, and the rest (dense chunks, keys, values,
# weights, scores) is compared slot by slot.


@functools.cache
def base_model(n_kv: int, dtype: torch.dtype, backend: str, last_token: bool = False):
    """A random tiny llama (2 layers, 4 query heads of 16) with a full cache; examples take caches of their own on its
    weights (``with_cache``). ``last_token``: its attention and MLP outputs zeroed (``wo``, ``w2``), so its logits are
    a function of the last token alone and its greedy continuation of a prompt ending in L is L's chain
    ``next_token(L), next_token(next_token(L)), ...`` whatever the cache holds: a prompt that holds that chain's start
    in its body makes prompt lookup extend the draft (its caches, q and k still come from the attention's inputs)."""
    gen = zmzoo.load("llama2-7b", weights="random", args_overrides={**SMALL, "n_kv_heads": n_kv}, device="cpu",
                     dtype=dtype, compile=False, max_seq_len=128, ops=backend, seed=3, verbose=False)
    if last_token:
        with torch.no_grad():
            for layer in gen.model.layers:
                layer.attention.wo.weight.zero_()
                layer.feed_forward.w2.weight.zero_()
    return gen


@functools.cache
def next_token(n_kv: int, dtype: torch.dtype, backend: str) -> list[int]:
    """The ``last_token`` model's greedy next token after each token id: one prefill of every id, whose logits at each
    position are those of its token alone."""
    full = base_model(n_kv, dtype, backend, last_token=True).with_cache("full")
    with torch.inference_mode():
        logits = full.model.prefill(torch.arange(SMALL["vocab_size"]).view(1, -1), row=0, all_logits=True)
    return logits[0].argmax(-1).tolist()


def lookup_ref(prompt: list[int], draft: list[int], n: int, min_match: int = 3, max_match: int = 8,
               skip_end: int = 32) -> list[int]:
    """Prompt-lookup drafting restated by brute force (docs/zeromerge.md, section 3): of every stretch of ``draft`` of
    min_match..max_match tokens that occurs in the prompt's body (all but its last ``skip_end`` tokens) with a body
    token after it, the longest, the earliest in the draft among equals; ``draft`` up to it, then what follows the
    stretch's first occurrence in the prompt, n tokens at most. ``draft`` unchanged without a match (no more greedy
    tokens: a draft costs its greedy steps whatever the lookup finds)."""
    body = prompt[: max(0, len(prompt) - skip_end)]
    best = None
    for end in range(1, len(draft) + 1):
        for m in range(min_match, min(max_match, end) + 1):
            at = [i for i in range(len(body) - m) if body[i : i + m] == draft[end - m : end]]
            if at and (best is None or m > best[0] or (m == best[0] and end < best[1])):
                best = (m, end, at[0] + m)
    if best is None:
        return draft
    _, end, cont = best
    return (draft[:end] + prompt[cont : cont + n - end])[:n]


@st.composite
def lookahead_cases(draw, small=False):
    """Settings and prompts. Half the histories run the ``last_token`` model (see ``base_model``), its prompts
    longer than the lookup's skipped end, with the start of the last token's chain planted (``plant``, in the test):
    ``lookahead_greedy`` of 3 or more then finds it, and of 4 or more finds a second stretch, the chain's tokens 2 to
    4, where that one is planted in the body (the earlier in the draft must win); one in four plants the chain's start
    in the skipped end only (not to be found). ``small`` (the interpreted kernels): one short prompt."""
    dense = draw(st.integers(1, 3))
    tail = draw(st.integers(2, 4))
    budget = draw(st.integers(tail + dense + 3, 16 if small else 24))
    last_token = False if small else draw(st.booleans())
    n = draw(st.integers(4, 8) if last_token else st.integers(1, 4 if small else 8))
    prompts, plant = [], []
    for _ in range(1 if small else draw(st.integers(1, 2))):
        length = draw(st.integers(41, 60) if last_token else st.integers(1, 24 if small else 80))
        prompts.append(draw(st.lists(st.integers(0, SMALL["vocab_size"] - 1), min_size=length, max_size=length)))
        # where the chain's first 4 tokens go (in the body), and the 3 after its first (anywhere)
        if last_token:
            body = length - 32
            if draw(st.integers(0, 3)) == 0:  # the chain's start in the skipped end only: lookup must not find it
                plant.append((draw(st.integers(body, length - 6)), None))
                continue
            at = draw(st.integers(0, body - 6))
            # the second stretch and the token after it, apart from the first plant: in the body or in the skipped end
            in_body = [j for j in range(1, body - 3) if j + 3 < at or j > at + 5]
            in_end = list(range(max(body, at + 6), length - 4))
            at2 = draw(st.sampled_from(in_end) if not in_body or draw(st.booleans()) else st.sampled_from(in_body))
            plant.append((at, at2))
        else:
            plant.append(None)
    # 0: all greedy; 1 and 2 greedy tokens are never found (3 at least)
    greedy = [3] + ([4, n - 1] if n >= 5 else []) if last_token else [0, 0, 1] + ([3] if n >= 4 else [])
    return {
        "n_kv": draw(st.sampled_from([1, 2])), "budget": budget, "tail": tail, "dense": dense, "prompts": prompts,
        "last_token": last_token, "plant": plant,
        "decay": draw(st.sampled_from([0.98, 0.9])), "score_pool": draw(st.sampled_from([None, None, 3])),
        "score_window": draw(st.sampled_from([None, None, 8])),
        "lookahead": n, "lookahead_prompt_weight": draw(st.sampled_from([1.0, 0.25, 0.0])),
        "lookahead_rounds": draw(st.sampled_from([1, 1, 2])),
        "lookahead_greedy": draw(st.sampled_from(greedy)) if n > 1 else 0,  # (n > 1 whenever last_token)
        "new_tokens": draw(st.integers(1, 2 if small else 4)),
    }


def record_drafts(gen) -> dict[int, list[list[int]]]:
    """Each row's draft tokens, one list per round, as the model hands them to every layer's ``rescore``."""
    drafts: dict[int, list[list[int]]] = {}
    rescore = gen.model._rescore

    def on_rescore(tokens, row, start):
        assert start == gen.pos[row]  # the draft sits right after the prompt
        drafts.setdefault(row, []).append(tokens[0].tolist())
        return rescore(tokens, row, start)

    gen.model._rescore = on_rescore
    return drafts


def record_inputs(gen) -> dict[tuple[int, int], dict]:
    """(layer, row) -> the q, k, v (float64, batch dim dropped) its cache got in ``prefill`` and in each ``rescore``,
    until ``del`` of the hooks (``stop_recording``)."""
    seen: dict[tuple[int, int], dict] = {}
    for layer, cache in enumerate(gen.model.caches):
        def on_prefill(q, k, v, row, layer=layer, orig=cache.prefill):
            seen[layer, row] = {"prefill": tuple(x[0].double() for x in (q, k, v)), "rescore": []}
            return orig(q, k, v, row)

        def on_rescore(q, k, v, row, layer=layer, orig=cache.rescore):
            seen[layer, row]["rescore"].append(tuple(x[0].double() for x in (q, k, v)))
            return orig(q, k, v, row)

        cache.prefill, cache.rescore = on_prefill, on_rescore
    return seen


def stop_recording(gen) -> None:
    for cache in gen.model.caches:
        del cache.prefill, cache.rescore


def full_qkv(base, tokens: list[int]) -> list[tuple[torch.Tensor, ...]]:
    """Every layer's q, k, v (float64, batch dim dropped) of a full cache's prefill of ``tokens``."""
    full = base.with_cache("full")
    captured = []
    for cache in full.model.caches:
        def on_prefill(q, k, v, row, _orig=cache.prefill):
            captured.append(tuple(x[0].double() for x in (q, k, v)))
            return _orig(q, k, v, row)

        cache.prefill = on_prefill
    with torch.inference_mode():
        full.model.prefill(torch.tensor([tokens]), row=0)
    return captured


def probs(q, k, lo, hi):
    """Group-summed softmax (Hkv, hi - lo, keys) of queries lo..hi-1 over the keys up to each (causal), float64."""
    n_kv, _, hd = k.shape
    g = q.shape[0] // n_kv
    logits = torch.einsum("hgid,hjd->hgij", q[:, lo:hi].reshape(n_kv, g, hi - lo, hd), k[:, :hi]) / math.sqrt(hd)
    causal = torch.arange(hi).view(1, -1) > torch.arange(lo, hi).view(-1, 1)
    return logits.masked_fill(causal, float("-inf")).softmax(-1).sum(1)


def check_lookahead(c, backend, dtype):
    prompts, n, budget = [list(p) for p in c["prompts"]], c["lookahead"], c["budget"]
    plain_kw = {k: c[k] for k in ("tail", "dense", "decay", "score_pool", "score_window")}
    la_kw = {k: c[k] for k in ("lookahead", "lookahead_prompt_weight", "lookahead_rounds", "lookahead_greedy")}
    base = base_model(c["n_kv"], dtype, backend, c["last_token"])
    if c["last_token"]:  # the start of the chain the draft will follow, in the body; other tokens after it
        nxt = next_token(c["n_kv"], dtype, backend)
        for p, (at, at2) in zip(prompts, c["plant"]):
            chain = [p[-1]]
            for _ in range(4):
                chain.append(nxt[chain[-1]])
            if at2 is not None:
                p[at2 : at2 + 3] = chain[2:5]
            p[at : at + 4] = chain[:4]
            event("the chain's start planted in the skipped end only" if at2 is None else
                  "a second stretch planted " + ("in the body" if at2 + 3 < len(p) - 32 else "in the skipped end"))
    gen = base.with_cache("zeromerge", kv_budget=budget, max_batch_size=len(prompts), **plain_kw, **la_kw)
    drafts = record_drafts(gen)
    inputs = record_inputs(gen)
    gen.prefill(prompts)
    stop_recording(gen)
    rows = len(prompts)
    long_rows = [r for r, p in enumerate(prompts) if len(p) > budget]
    event(f"{len(long_rows)} of {rows} rows drafted")
    # the draft leaves no trace: positions at the prompts' ends, nothing pending; only prompts past the budget drafted
    assert gen.pos[:rows].tolist() == [len(p) for p in prompts]
    assert all(cache.draft_request() == {} and not cache._pending for cache in gen.model.caches)
    assert sorted(drafts) == long_rows and all(len(d) == c["lookahead_rounds"] for d in drafts.values())
    # round 1's draft: plain ZeroMerge's greedy tokens (the first from the prompt's logits), extended from the prompt
    # after the first `lookahead_greedy` of them where that finds a stretch of them in it
    plain = base.with_cache("zeromerge", kv_budget=budget, max_batch_size=rows, **plain_kw)
    greedy = plain.generate(prompts, max_new_tokens=n, return_ids=True)
    g = c["lookahead_greedy"] or n
    for r in long_rows:
        want = lookup_ref(prompts[r], greedy[r][:g], n) if g < n else greedy[r][:n]
        assert drafts[r][0] == want, (r, drafts[r][0], want)
        at, at2 = c["plant"][r] if c["last_token"] else (None, None)
        if at2 is not None and 3 <= g < n and greedy[r][:3] == prompts[r][at + 1 : at + 4]:
            assert len(want) > g, "the planted chain was not found"  # (the reference's own check)
        event("greedy draft" if g == n else "prompt lookup extended the draft" if len(want) > g else
              "prompt lookup found nothing: the greedy tokens alone")

    hd = base.args.head_dim
    n_heads, n_kv = base.args.n_heads, base.args.n_kv_heads
    key_tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2**-7, atol=1e-5)
    score_tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-5)
    for r, prompt in enumerate(prompts):
        t = len(prompt)
        rounds = drafts.get(r, [])
        full = [full_qkv(base, prompt + d) for d in rounds]  # per round, per layer: q, k, v of prompt + draft
        for layer, cache in enumerate(gen.model.caches):
            # the reference starts from what the cache was fed: the prompt's q, k, v, and each round's draft's
            got = inputs[layer, r]
            q, k, v = got["prefill"]
            assert len(got["rescore"]) == len(rounds), (r, layer)
            for i, per_layer in enumerate(full):
                # the draft's q, k, v: those of a full prefill of prompt + draft (the rescore attends over the whole
                # prompt, not its compressed cache), to the model dtype's rounding at the vectors' scale (bf16: the
                # layers' GEMMs round differently for another number of rows)
                for name, x, y in zip("qkv", got["rescore"][i], per_layer[layer]):
                    scale = 1e-4 if dtype == torch.float32 else 2**-5
                    torch.testing.assert_close(x, y[:, t:], rtol=0, atol=scale * float(y.abs().max()),
                                               msg=lambda m, name=name, i=i: f"row {r} layer {layer} round {i} {name}: "
                                                                             f"{m}")
            # mass: every head's weights sum to the prompt's length
            assert torch.equal(cache.w[r].sum(-1), torch.full((n_kv,), float(t))), (r, layer)
            if c["score_window"]:
                s = probs(q, k, max(0, t - c["score_window"]), t)[:, :, :t].sum(1)
            else:
                s = torch.einsum("hij,i->hj", probs(q, k, 0, t), c["decay"] ** torch.arange(t - 1, -1, -1.0).double())
            if t <= budget:  # not compressed, not drafted: the prompt in order with its unpooled scores
                assert torch.equal(cache.k[r, :, :t].double(), k) and torch.equal(cache.v[r, :, :t].double(), v)
                assert torch.all(cache.w[r, :, :t] == 1)
                torch.testing.assert_close(cache.s[r, :, :t].double(), s, **score_tol)
                continue
            s = s * c["lookahead_prompt_weight"]
            for qd, kd, _ in got["rescore"]:  # each round folds its draft's attention in, as decode steps would
                nd = qd.shape[1]
                p = probs(torch.cat([q, qd], 1), torch.cat([k, kd], 1), t, t + nd)  # (Hkv, N, T + N)
                for i in range(nd):
                    s = c["decay"] * s + p[:, i, :t]
            orc = ZeroMergeOracle(n_heads, n_kv, hd, budget, tail=c["tail"], dense=c["dense"], decay=c["decay"],
                                  score_pool=c["score_pool"])
            # the tokens the cache's top slots hold (the prompt keys nearest to theirs): a top selection of the
            # reference's pooled scores, up to the scores' tolerance; the reference then selects the same ones (where
            # a near-tie made the cache take the other side, its own choice differs)
            cand, keep = t - c["tail"], []
            for h in range(n_kv):
                kept = torch.cdist(cache.k[r, h, c["dense"] : budget - c["tail"]].double(), k[h, :cand]).argmin(-1)
                kept = kept.tolist()
                assert kept == sorted(set(kept)), (r, layer, h, kept)
                pooled = orc.pool_scores(s[h].tolist())
                low = min(pooled[j] for j in kept)
                high = max((pooled[j] for j in range(cand) if j not in kept), default=-math.inf)
                slack = score_tol["rtol"] * max(map(abs, pooled)) + score_tol["atol"]
                assert low >= high - slack, (r, layer, h, "not a top selection of the reference scores", low, high)
                keep.append(kept)
            own = orc.select_prompt(k[:, :t], v[:, :t], s.tolist())
            if keep != [[sl.tokens[0] for sl in hs[orc.dense : budget - c["tail"]]] for hs in own]:
                event("near-tie at the top-k boundary: the reference follows the cache's choice")
            slots = orc.select_prompt(k[:, :t], v[:, :t], s.tolist(), keep=keep)
            for h in range(n_kv):
                torch.testing.assert_close(cache.k[r, h].double(), torch.stack([sl.key for sl in slots[h]]), **key_tol)
                torch.testing.assert_close(cache.v[r, h].double(), torch.stack([sl.value for sl in slots[h]]),
                                           **key_tol)
                assert cache.w[r, h].tolist() == [sl.w for sl in slots[h]], (r, layer, h)
                torch.testing.assert_close(cache.s[r, h].double(), torch.tensor([sl.s for sl in slots[h]],
                                                                                dtype=torch.float64), **score_tol)
    # the other rows are unaffected: each row's caches and drafts are what a batch of one computes
    for r, prompt in enumerate(prompts if rows > 1 else []):
        alone = base.with_cache("zeromerge", kv_budget=budget, max_batch_size=1, **plain_kw, **la_kw)
        alone_drafts = record_drafts(alone)
        alone.prefill([prompt])
        assert alone_drafts.get(0) == drafts.get(r), r
        for layer, (a, b) in enumerate(zip(alone.model.caches, gen.model.caches)):
            for name in ("k", "v", "w", "s", "dense_k", "dense_v", "base"):
                assert torch.equal(getattr(a, name)[0], getattr(b, name)[r]), (r, layer, name)
    # and after a generate, the same prefill again gives the same caches (the slots a prompt that fits leaves empty
    # may keep the decoded tokens' keys and values: w = 0 there, never read)
    names = ("k", "v", "w", "s", "dense_k", "dense_v", "base")
    after = [{name: getattr(cache, name).clone() for name in names} for cache in gen.model.caches]
    gen.generate(prompts, max_new_tokens=c["new_tokens"], return_ids=True)
    gen.prefill(prompts)
    for layer, cache in enumerate(gen.model.caches):
        for name, buf in after[layer].items():
            for r, prompt in enumerate(prompts):
                got, want = getattr(cache, name)[r], buf[r]
                if name in ("k", "v"):
                    got, want = got[:, : min(len(prompt), budget)], want[:, : min(len(prompt), budget)]
                assert torch.equal(got, want), (layer, r, name)


def planted(plant, greedy, n):
    """A ``last_token`` case with one 50-token prompt (its body: the first 18) and the chain planted at ``plant``."""
    return {"n_kv": 1, "budget": 12, "tail": 3, "dense": 2, "prompts": [[(7 * i + 3) % 128 for i in range(50)]],
            "last_token": True, "plant": [plant], "decay": 0.98, "score_pool": None, "score_window": None,
            "lookahead": n, "lookahead_prompt_weight": 1.0, "lookahead_rounds": 1, "lookahead_greedy": greedy,
            "new_tokens": 1}


@examples(20)
@given(dtype=st.sampled_from([torch.float32, torch.bfloat16]), c=lookahead_cases())
@example(dtype=torch.float32, c=planted((2, 10), 5, 7))  # two stretches in the body: the earlier in the draft wins
@example(dtype=torch.float32, c=planted((40, None), 4, 6))  # the chain's start in the skipped end only
def test_lookahead_selection_property(dtype, c):
    """After a generator's prefill with a lookahead: the draft is plain ZeroMerge's greedy continuation (or extended
    by prompt lookup), every layer's cache is the reference selection of the prompt scored with the draft(s) folded
    in, every head's mass is the prompt's length, and the draft leaves no trace (positions at the prompts' ends, other
    batch rows as alone, a second generate the same)."""
    check_lookahead(c, "torch", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@examples(2)
@given(c=lookahead_cases(small=True))
def test_lookahead_selection_property_triton(dtype, c):
    check_lookahead(c, "triton", dtype)


def lookup_by_table(prompt, draft, n, min_match=3, skip_end=32, classes=None, restate=4, occurrences=1):
    """prompt_lookup_spans written plainly (a dict of every m-gram's positions in the body), the oracle of the numpy
    one: (draft, spans)."""
    body = len(prompt) - skip_end
    if body <= min_match:
        return list(draft), []
    cls = (lambda t: t) if classes is None else (lambda t: int(classes[t]))
    pr, dr = [cls(t) for t in prompt], [cls(t) for t in draft]
    tail = pr[body:]
    src = tail + dr
    for in_draft, m in itertools.product((True, False), range(min(len(src), 8), min_match - 1, -1)):
        positions = {}
        for i in range(body - m):
            positions.setdefault(tuple(pr[i : i + m]), []).append(i)
        for end in range(m, len(src) + 1):
            if (end - m >= len(tail)) != in_draft:
                continue
            conts = []
            for at in positions.get(tuple(src[end - m : end]), []):
                cont = at + m
                nxt = pr[cont : cont + restate]
                if restate and any(tail[j : j + len(nxt)] == nxt for j in range(len(tail) - len(nxt) + 1)):
                    continue  # a restatement of the tail
                conts.append(cont)
            if not conts:
                continue
            head = list(draft[: end - len(tail)]) if end > len(tail) else list(draft)
            out = (head + list(prompt[conts[0] : conts[0] + n - len(head)]))[:n]
            copied = len(out) - len(head)
            return out, ([(c, min(c + copied, len(prompt))) for c in conts[:occurrences]] if copied > 0 else [])
    return list(draft), []


@examples(300)
@given(vocab=st.integers(2, 6), prompt_len=st.integers(0, 90), draft_len=st.integers(0, 12), n=st.integers(1, 40),
       skip_end=st.integers(0, 40), min_match=st.integers(1, 4), merge=st.booleans(), occurrences=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_prompt_lookup_is_the_table_lookup(vocab, prompt_len, draft_len, n, skip_end, min_match, merge, occurrences,
                                           seed):
    """The vectorised prompt lookup gives what the table of m-grams gives (small vocabularies: many matches, ties
    between lengths and positions, matches at the body's edge, in the tail and across it, restatements skipped), for
    drafts shorter and longer than 8, comparing ids or classes (``merge``: ids 2k and 2k+1 one class): the same draft
    and the same spans (the copied range, then up to ``occurrences`` - 1 ranges after later occurrences); and
    ``prompt_lookup`` is its draft."""
    import random

    import numpy as np

    from zmzoo.models.transformer import prompt_lookup, prompt_lookup_spans

    r = random.Random(seed)
    prompt = [r.randrange(vocab) for _ in range(prompt_len)]
    draft = [r.randrange(vocab) for _ in range(draft_len)]
    classes = np.arange(vocab) // 2 if merge else None
    kw = dict(min_match=min_match, skip_end=skip_end, classes=classes)
    got = prompt_lookup_spans(prompt, draft, n, occurrences=occurrences, **kw)
    assert got == lookup_by_table(prompt, draft, n, occurrences=occurrences, **kw)
    assert prompt_lookup(prompt, draft, n, **kw) == got[0]
    out, spans = got
    if spans:  # the first span is what the draft copied
        a, b = spans[0]
        assert out[len(out) - (b - a):] == prompt[a:b] and b > a
    event("matched" if spans else "unchanged")


def test_prompt_lookup_examples():
    import numpy as np

    from zmzoo.models.transformer import prompt_lookup

    prompt = [9, 1, 2, 3, 4, 5, 6, 7] + [0] * 32  # the last 32 (skip_end) are never looked in
    assert prompt_lookup(prompt, [1, 2, 3], 6) == [1, 2, 3, 4, 5, 6]  # continued after the stretch
    assert prompt_lookup(prompt, [8, 2, 3, 4, 8], 6) == [8, 2, 3, 4, 5, 6]  # the draft's tail after it replaced
    assert prompt_lookup(prompt, [8, 8, 8], 6) == [8, 8, 8]  # nothing matches: unchanged
    assert prompt_lookup(prompt, [0, 0, 0], 6) == [0, 0, 0]  # only in the skipped end
    assert prompt_lookup([1, 2, 3, 4], [1, 2, 3], 6, skip_end=0) == [1, 2, 3, 4]
    assert prompt_lookup([4, 1, 2, 3], [1, 2, 3], 6, skip_end=0) == [1, 2, 3]  # a stretch must leave a next token
    # the stretch in the tail (an answer prefix the prompt ends with): the whole draft, then the continuation
    needle, question = [20, 21, 22, 23, 40, 41, 42], [30, 20, 21, 22, 23, 31, 32, 33, 34]
    prompt = [9] * 10 + needle + [9] * 10 + question + [8] * 5 + [20, 21, 22, 23]
    assert prompt_lookup(prompt, [50, 51], 8, skip_end=18) == [50, 51, 40, 41, 42, 9, 9, 9]
    # the question asked just before the tail shares a longer stretch with the answer prefix than the needle, but
    # the tail holds what follows it (the question's rest, restated by the prefix): skipped
    needle, question = [20, 21, 22, 40, 41, 42, 43], [30, 20, 21, 22, 31, 32, 33, 34, 36]
    prefix = [20, 21, 22, 31, 32, 33, 35]
    prompt = [9] * 10 + needle + [9] * 10 + question + [8, 8] + prefix
    tail = 3 + 2 + len(prefix)  # from the question's 33 on
    assert prompt_lookup(prompt, [50], 4, skip_end=tail, restate=2) == [50, 40, 41, 42]
    assert prompt_lookup(prompt, [50], 4, skip_end=tail, restate=0) == [50, 32, 33, 34]  # (not skipped: restate=0)
    # classes: 22 written as 24 in the draft ("number" for "numbers") still matches
    classes = np.arange(60)
    classes[24] = 22
    prompt = [9] * 5 + needle + [0] * 32
    assert prompt_lookup(prompt, [20, 21, 24], 5) == [20, 21, 24]
    assert prompt_lookup(prompt, [20, 21, 24], 5, classes=classes) == [20, 21, 24, 40, 41]


def test_prompt_lookup_spans_examples():
    """Where the draft's looked-up tokens come from, and the later occurrences of the stretch (several needles that
    share their sentence): positions of the prompt, half-open, the copied range first."""
    from zmzoo.models.transformer import prompt_lookup_spans

    prompt = [9, 1, 2, 3, 4, 5, 6, 7] + [0] * 32
    assert prompt_lookup_spans(prompt, [1, 2, 3], 6) == ([1, 2, 3, 4, 5, 6], [(4, 7)])
    assert prompt_lookup_spans(prompt, [8, 8, 8], 6) == ([8, 8, 8], [])  # nothing matches
    assert prompt_lookup_spans(prompt, [1, 2, 3, 4, 5, 6], 6) == ([1, 2, 3, 4, 5, 6], [])  # nothing left to copy
    # three needles "20 21 22 <value>", the answer prefix "20 21 22" in the tail: every value's range, the first
    # copied; the question (30 20 21 22 31) is a restatement, not a needle
    body = [9] * 4 + [20, 21, 22, 40, 41] + [9] * 5 + [20, 21, 22, 50, 51] + [9] * 3 + [20, 21, 22, 60, 61] + [9] * 4
    prompt = body + [30, 20, 21, 22, 31, 8, 8, 20, 21, 22]
    out, spans = prompt_lookup_spans(prompt, [70], 4, skip_end=10, occurrences=4)
    assert out == [70, 40, 41, 9] and spans == [(7, 10), (17, 20), (25, 28)]
    assert prompt_lookup_spans(prompt, [70], 4, skip_end=10, occurrences=2)[1] == [(7, 10), (17, 20)]
    assert prompt_lookup_spans(prompt, [70], 4, skip_end=10)[1] == [(7, 10)]


def test_compiled_rescore_matches_eager_with_one_graph(monkeypatch, capsys):
    """The rescore a compiling Generator runs (CPU inductor) goes through one graph for both layers and every prompt
    length and draft length (``RescoreStep``), and leaves the eager rescore's caches (fp32: keys, values, scores
    within 1e-5, weights equal) and teacher-forced logits after it (1e-5). Prompts of 300, 517 and 1200 tokens share
    the graph; past T + N = 4096 (4501 tokens: the eager chunk sums take two blocks there) inductor's C++ code guards
    its fp32 sums' accumulator and compiles a second graph, the bound ``RescoreStep`` states. Drafts alternate between
    8 tokens (the greedy ones, no lookup match) and 32 (the lookup stubbed to extend odd-length prompts' drafts from
    the prompt)."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.testing import CompileCounterWithBackend

    from zmzoo.models import transformer
    from zmzoo.models.transformer import rescore_layer

    def lookup(prompt, draft, n, **kw):  # the same stand-in for both generators
        return ((draft + list(prompt[: n - len(draft)]))[:n], [(0, n - len(draft))]) if len(prompt) % 2 else (draft, [])

    monkeypatch.setattr(transformer, "prompt_lookup_spans", lookup)
    lengths = []
    monkeypatch.setattr(transformer.Transformer, "_rescore",
                        lambda self, tokens, *a, _f=transformer.Transformer._rescore, **k:
                        (lengths.append(tokens.shape[1]), _f(self, tokens, *a, **k))[1])
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    # two rows, the prompt in row 0: the graph writes into views of two-row buffers
    kw = dict(method="zeromerge", kv_budget=64, preset="retrieval", max_seq_len=4600, max_batch_size=2)
    eager = zmzoo.load("llama2-7b", weights="random", args_overrides={**SMALL, "max_position_embeddings": 4700},
                       device="cpu", dtype=torch.float32, compile=False, seed=3, verbose=False, **kw)
    # what a compiling Generator builds (``Generator.__init__``), here beside an eager decode step: the test is the
    # rescore's, and the decode step's inductor compile would double its time (test_inductor_compiled_decode_matches_
    # eager is that one's)
    comp = eager.with_cache(**kw)
    comp._rescore_fn, comp._rescore_compiled = transformer.RescoreStep(counter), False
    comp.verbose = True  # it announces the compile
    g = torch.Generator().manual_seed(0)
    names = ("k", "v", "w", "s", "dense_k", "dense_v", "base")
    for t in (300, 517, 1200, 4501):
        ids = torch.randint(0, 128, (t,), generator=g).tolist()
        cont = torch.randint(0, 128, (6,), generator=g).tolist()
        for gen in (eager, comp):
            gen.prefill([ids])
        assert lengths[-2:] == ([32, 32] if t % 2 else [8, 8])  # the draft's length, eager and compiled
        assert_caches_match(eager, comp, names, t)
        torch.testing.assert_close(comp.score(ids, cont), eager.score(ids, cont), rtol=1e-5, atol=1e-5)
        graphs = len(_debug_get_cache_entry_list(rescore_layer.__code__))
        assert graphs == 1 if t + 32 <= 4096 else graphs <= 2, (t, graphs)
    assert counter.frame_count == graphs
    err = capsys.readouterr().err
    assert err.count("compiling the lookahead's rescore") == 1 and "rescore compiled in" in err


def test_pin_positions_share_the_count_and_skip_the_tail():
    """``lookahead_pin``: at most that fraction of the top slots, every span's first positions before any span's
    later ones, each span extended by ``lookahead_pin_extend``, only ``lookahead_pin_spans`` spans, nothing in the
    tail (kept anyway); off (0) pins nothing and ``draft_source`` leaves no pin in the stash."""
    c = gen("zeromerge", kv_budget=40, lookahead=8, lookahead_pin=0.2, lookahead_pin_extend=2,
            lookahead_pin_spans=2).model.caches[0]
    assert (c.budget, c.tail, c.dense) == (40, 4, 1) and c.pin_count() == 7  # floor(0.2 * 35)
    assert c.pin_positions(50, [(10, 13), (20, 30), (1, 3)]) == [10, 11, 12, 13, 20, 21, 22]
    assert c.pin_positions(50, [(44, 49)]) == [44, 45]  # 46.. is the tail
    assert c.pin_positions(50, []) == []
    off = gen("zeromerge", kv_budget=40, lookahead=8).model.caches[0]
    assert off.pin_count() == 0 and off.pin_positions(50, [(10, 13)]) == []
    ext = gen("zeromerge", kv_budget=40, lookahead=8, lookahead_pin=0.2, lookahead_pin_extend=3, lookahead_pin_spans=2,
              lookahead_pin_copied=False).model.caches[0]  # the positions past each span, not the span's own
    assert ext.pin_positions(50, [(10, 13), (20, 30), (1, 3)]) == [13, 14, 15, 30, 31, 32]
    assert ext.pin_positions(50, [(40, 45)]) == [45]  # 46.. is the tail


def _pinned_run(monkeypatch, pin, span=(40, 46), t=80, budget=20):
    """A random-weight model's lookahead over a t-token prompt with the lookup stubbed to copy ``span``: each layer's
    prompt keys (captured before the selection) and its cache after the rescore."""
    from zmzoo.cache.zeromerge import ZeroMergeCache
    from zmzoo.models import transformer

    def lookup(prompt, draft, n, **kw):
        a, b = span
        return (draft + list(prompt[a:b]))[:n], [span]

    monkeypatch.setattr(transformer, "prompt_lookup_spans", lookup)
    g = gen("zeromerge", kv_budget=budget, lookahead=10, lookahead_greedy=4, lookahead_pin=pin, lookahead_pin_extend=6)
    keys = {}
    for i, c in enumerate(g.model.caches):
        assert isinstance(c, ZeroMergeCache)
        c.prompt_hook = lambda row, k, s, i=i: keys.__setitem__(i, k[0].clone())
    ids = torch.randint(1, 128, (t,), generator=torch.Generator().manual_seed(4)).tolist()
    g.prefill([ids])
    return keys, g.model.caches


def _kept(cache, k, pos):
    """Whether every head of ``cache`` (row 0) holds prompt position ``pos``'s key as a single slot (weight 1)."""
    single = cache.w[0] == 1  # (Hkv, B)
    same = (cache.k[0].unsqueeze(2) == k[:, pos].unsqueeze(1).unsqueeze(2)).all(-1)[..., 0]  # (Hkv, B)
    return bool((same & single).any(-1).all())


def test_pinned_rescore_keeps_the_looked_up_span_in_every_head(monkeypatch):
    """With ``lookahead_pin`` every layer and KV head keeps the copied span and its extension (40 .. 51 here, capped
    at floor(0.5 * 17) = 8 positions: 40 .. 47) as single slots; without it,
    the same prompt and draft lose some of them (so the test can fail)."""
    keys, caches = _pinned_run(monkeypatch, 0.5)
    pinned = range(40, 48)
    for i, c in enumerate(caches):
        assert c.pin_count() == 8
        for pos in pinned:
            assert _kept(c, keys[i], pos), (i, pos)
    keys0, caches0 = _pinned_run(monkeypatch, 0.0)
    assert not all(_kept(c, keys0[i], pos) for i, c in enumerate(caches0) for pos in pinned)


def test_compiled_pinned_rescore_matches_eager(monkeypatch):
    """The compiled rescore (``RescoreStep``, CPU inductor) with a pin vector gives the eager rescore's caches (fp32:
    keys, values, scores within 1e-5, weights equal) and teacher-forced logits (1e-5), over two prompt lengths in one
    graph."""
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.testing import CompileCounterWithBackend

    from zmzoo.models import transformer
    from zmzoo.models.transformer import rescore_layer

    def lookup(prompt, draft, n, **kw):  # copies prompt[40 : 40 + n - len(draft)], a second range at 200
        m = n - len(draft)
        return (draft + list(prompt[40 : 40 + m]))[:n], [(40, 40 + m), (200, 200 + m)]

    monkeypatch.setattr(transformer, "prompt_lookup_spans", lookup)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("inductor")
    kw = dict(method="zeromerge", kv_budget=64, preset="retrieval", max_seq_len=700, lookahead_pin=0.5,
              lookahead_pin_extend=8, lookahead_pin_spans=2)
    eager = zmzoo.load("llama2-7b", weights="random", args_overrides={**SMALL, "max_position_embeddings": 800},
                       device="cpu", dtype=torch.float32, compile=False, seed=3, verbose=False, **kw)
    comp = eager.with_cache(**kw)
    comp._rescore_fn, comp._rescore_compiled = transformer.RescoreStep(counter), False
    g = torch.Generator().manual_seed(0)
    for t in (300, 517):
        ids = torch.randint(0, 128, (t,), generator=g).tolist()
        cont = torch.randint(0, 128, (6,), generator=g).tolist()
        for gen_ in (eager, comp):
            gen_.prefill([ids])
        assert all(c.pin_count() == 28 for c in eager.model.caches)  # floor(0.5 * (64 - 6 - 1))
        assert_caches_match(eager, comp, ("k", "v", "w", "s", "dense_k", "dense_v", "base"), t)
        torch.testing.assert_close(comp.score(ids, cont), eager.score(ids, cont), rtol=1e-5, atol=1e-5)
    assert len(_debug_get_cache_entry_list(rescore_layer.__code__)) == 1 and counter.frame_count == 1


def test_lookahead_per_slot_scales_the_draft_with_the_budget():
    """``lookahead_per_slot = f``: the draft is round(f * B) tokens, at least the greedy ones, at most ``lookahead``,
    resolved per budget (the harness's budgets are per prompt) into the ``lookahead`` the cache is built with."""
    from zmzoo.cache import resolve_cache_config

    def draft(budget, **kw):
        cfg = resolve_cache_config(max_seq_len=4096, kv_budget=budget, lookahead=64, lookahead_greedy=8, **kw)
        assert "lookahead_per_slot" not in cfg.cache_kwargs()
        return cfg.cache_kwargs()["lookahead"]

    assert [draft(b, lookahead_per_slot=0.64) for b in (10, 43, 50, 90, 100, 2048)] == [8, 28, 32, 58, 64, 64]
    assert draft(50) == 64  # off: the fixed length
    for bad in (-0.5, True, "1"):
        with pytest.raises(ValueError, match="lookahead_per_slot"):
            draft(50, lookahead_per_slot=bad)
    with pytest.raises(ValueError, match="lookahead_per_slot.*lookahead > 0"):
        resolve_cache_config(max_seq_len=4096, kv_budget=50, lookahead_per_slot=0.5)

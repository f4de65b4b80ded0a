"""ZeroMerge's lookahead (the ``retrieval`` preset): the prompt is compressed again with the scores a greedy draft adds.

Reference, computed independently of the cache's rescoring path: the draft is plain ZeroMerge's greedy continuation of
the prompt (the cache as the first, plain pass leaves it, which is what the model drafts through); one causal pass of
a full cache over prompt + draft gives every layer's queries and keys; each draft query's group-summed softmax over
the keys before it is folded into the prompt's decayed scores as a decode step would (``s = decay * s + p``);
``select`` of those scores is the expected cache.
"""

from __future__ import annotations

import math

import pytest
import torch

import zmzoo
from tests.conftest import TINY
from zmzoo.cache.base import KVCache
from zmzoo.cache.full import FullCache

SMALL = {**TINY, "max_position_embeddings": 256}


def gen(method="full", **kw):
    return zmzoo.load("llama2-7b", weights="random", args_overrides=SMALL, device="cpu", dtype=torch.float32,
                      compile=False, max_seq_len=128, method=method, seed=3, verbose=False, **kw)


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
    assert resolve_cache_config(max_seq_len=1000, kv_ratio=0.1, preset="retrieval", lookahead=3).lookahead == 3
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

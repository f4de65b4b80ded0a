"""Eviction baselines in ZeroMerge's static frame, so that every comparison is at the same budget and shapes.

- ``h2o``: the same decayed scores as ZeroMerge; the lowest-scored token is evicted instead of merged (ZeroMerge's own
  ablation). Frame ``[top | ring]``.
- ``streaming`` (StreamingLLM): the first ``sinks`` tokens plus a ring of the most recent ones. Keys keep their true
  RoPE positions (no position shifting), like every zmzoo cache.
- ``snapkv``: the prompt scored from its last ``score_window`` queries (undecayed), max-pooled over ``score_pool``
  neighbours; top-scored plus the recent ``tail`` kept; no merging; during decode the recent ring rolls.
- ``tova`` (TOVA): a slot's score is the attention it gets from the current query alone (decay 0); the lowest-scored
  token is evicted at every step. Frame ``[top | ring]``.
- ``knorm`` (KNorm): a token's score is minus its key's L2 norm, for prompt and decoded tokens alike; the
  highest-norm token is evicted. Frame ``[top | ring]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zmzoo.cache.zeromerge import ZeroMergeCache


class H2OCache(ZeroMergeCache):
    method = "h2o"
    policy = "evict"
    compensate = False  # every slot stands for one token

    def __init__(self, **kw):
        kw["dense"] = 0
        super().__init__(**kw)


class SnapKVCache(ZeroMergeCache):
    method = "snapkv"
    policy = "ring"
    compensate = False
    decode_scores = False

    def __init__(self, **kw):
        kw["dense"] = 0
        super().__init__(**kw)


class StreamingCache(ZeroMergeCache):
    method = "streaming"
    policy = "ring"
    compensate = False
    decode_scores = False

    def __init__(self, *, sinks: int = 4, **kw):
        self.sinks = sinks
        kw["dense"] = sinks
        kw["tail"] = kw["budget"] - sinks + 1  # ring = budget - sinks
        super().__init__(**kw)

    def _needs_prompt_scores(self, t: int) -> bool:
        return False  # sinks + the most recent tokens: no scores needed

    def _select(self, k: Tensor, v: Tensor, scores: Tensor | None, pin: Tensor | None = None):
        n_kv, t, d = k.shape  # (no lookahead, so no pin: the sinks and the ring are the selection)
        keep = torch.cat([torch.arange(self.sinks), torch.arange(t - self.ring, t)]).to(k.device)
        ww = torch.ones(n_kv, self.budget, dtype=torch.float32, device=k.device)
        return k[:, keep], v[:, keep], ww, torch.zeros_like(ww), None, None


class TOVACache(ZeroMergeCache):
    """TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs", arXiv 2401.06104): keep the tokens the current
    query attends to most; no accumulated history.

    - prefill (T > B): scored by the last prompt query's attention probabilities alone (``score_window`` 1); the
      ``B - tail`` highest-scored of the first ``T - tail`` tokens and the last ``tail`` are kept.
    - decode: each step's attention replaces every slot's score (``ops.decode_attention``'s ``s = decay*s + p`` with
      decay 0, fixed here and not a setting); once full, the lowest-scored slot outside the ring is evicted (policy
      ``evict``, as ``h2o``).

    Where it differs from the paper and kvpress's ``TOVAPress``:
    - scores are per KV head, the probabilities of the group's query heads summed; TOVA's cache and kvpress average
      the probabilities over all heads of the layer and evict the same token from every head;
    - the ``[top | ring]`` frame protects the ``R = tail - 1`` most recent tokens and the new one: ``tail=2`` is
      closest to the paper (the new token and the previous one protected; kvpress protects the last prompt token at
      prefill); the default ``tail`` (0.1 of the budget) is that of every baseline here, for comparisons at one frame;
    - it evicts during decode as the paper does; kvpress's presses compress the prompt once, at prefill.
    """

    method = "tova"
    policy = "evict"
    compensate = False  # every slot stands for one token

    def __init__(self, **kw):
        kw.update(dense=0, decay=0.0, score_window=1, score_pool=None)
        super().__init__(**kw)

    def _needs_prompt_scores(self, t: int) -> bool:
        return t > self.budget  # a prompt that fits: the first decode step replaces every score before it is read


class KNormCache(ZeroMergeCache):
    """KNorm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
    arXiv 2406.11430): keep the tokens whose keys have the lowest L2 norm.

    - prefill (T > B): score = -||k|| of each prompt token per KV head (after RoPE, a rotation: the norm is the
      pre-RoPE one); the ``B - tail`` highest-scored (lowest-norm) of the first ``T - tail`` tokens and the last
      ``tail`` are kept.
    - decode: no attention is folded into the scores; the new token's score is -||k_new|| (``new_token_score``), and
      once full the lowest-scored (highest-norm) slot outside the ring is evicted (policy ``evict``).

    Where it differs from the paper and kvpress's ``KnormPress``: like kvpress it scores every layer and KV head by its
    own keys, but kvpress compresses the prompt once at prefill and keeps no recent window, while zmzoo's frame keeps
    the last ``tail`` tokens of the prompt and evicts during decode too, outside the ring of ``tail - 1`` recent ones.
    """

    method = "knorm"
    policy = "evict"
    compensate = False
    decode_scores = False

    def __init__(self, **kw):
        kw.update(dense=0, score_window=None, score_pool=None)
        super().__init__(**kw)

    def _needs_prompt_scores(self, t: int) -> bool:
        return True  # decode evicts by these scores even when the prompt fits

    def prompt_scores(self, q: Tensor, k: Tensor, lse: Tensor | None = None) -> Tensor:
        return -k[0].float().norm(dim=-1)  # (Hkv, T)

    def new_token_score(self, k_new: Tensor, s_new: Tensor | None) -> Tensor:
        return -k_new.float().norm(dim=-1)  # (B, Hkv)

"""Eviction baselines in ZeroMerge's static frame, so that every comparison is at the same budget and shapes.

- ``h2o``: the same decayed scores as ZeroMerge; the lowest-scored token is evicted instead of merged (ZeroMerge's own
  ablation). Frame ``[top | ring]``.
- ``streaming`` (StreamingLLM): the first ``sinks`` tokens plus a ring of the most recent ones. Keys keep their true
  RoPE positions (no position shifting), like every zmzoo cache.
- ``snapkv``: the prompt scored from its last ``score_window`` queries (undecayed), max-pooled over ``score_pool``
  neighbours; top-scored plus the recent ``tail`` kept; no merging; during decode the recent ring rolls.
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

    def _select(self, k: Tensor, v: Tensor, scores: Tensor | None):
        n_kv, t, d = k.shape
        keep = torch.cat([torch.arange(self.sinks), torch.arange(t - self.ring, t)]).to(k.device)
        ww = torch.ones(n_kv, self.budget, dtype=torch.float32, device=k.device)
        return k[:, keep], v[:, keep], ww, torch.zeros_like(ww), None, None

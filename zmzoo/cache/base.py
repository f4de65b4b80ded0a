"""The cache protocol: one ``nn.Module`` per layer that owns attention.

The model hands each layer's cache q, k, v after RoPE and gets the attention output back. It never asks which cache
it has: every method (full, zeromerge, h2o, streaming, snapkv) implements the same calls, with no-op defaults here
for what does not apply to it.

- ``prefill(q, k, v, row)``: q (1, H, T, D), k/v (1, Hkv, T, D) of one prompt at positions 0..T-1, stored into batch
  row ``row``; returns the causal attention output (1, H, T, D). Runs eagerly, once per prompt.
- ``draft_steps()``, ``draft(q, k, v, step)``, ``finish_prefill()``: after the prompt's prefill the model asks every
  cache how many greedy draft tokens it wants decoded over the prompt before it compresses it (ZeroMerge's
  ``lookahead``; 0 for every other cache); it decodes that many, feeding each layer's q/k/v to ``draft``, then calls
  ``finish_prefill`` on every cache. The draft is discarded: decoding starts at position T.
- ``decode(q, k, v, pos)``: q (B, H, 1, D), k/v (B, Hkv, 1, D) of one new token per row at absolute positions
  ``pos`` (B,) (= tokens the row has seen before it); returns (B, H, 1, D). Static shapes, no host syncs, no Python
  branches on tensor values: ``torch.compile(fullgraph=True)`` and CUDA graphs capture it once.
- ``extra_positions``: how many positions past ``max_seq_len`` the cache may be fed (the draft's), so the model builds
  its RoPE tables that long.

Buffers are allocated once in ``__init__`` (``persistent=False``) and only ever written in place. Which kernel runs
(Triton or the torch reference) is the ops' business (``zmzoo.ops``): a cache passes its ``backend`` through.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class KVCache(nn.Module):
    """Base class; subclasses set ``method`` and implement ``prefill`` and ``decode`` (see the module docstring)."""

    method = "base"
    extra_positions = 0  # positions past max_seq_len this cache may be fed (the prefill draft's)

    def __init__(
        self,
        *,
        batch_size: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
        sliding_window: int | None = None,
        backend: str = "torch",
    ):
        super().__init__()
        self.batch_size = batch_size
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.sliding_window = sliding_window
        self.backend = backend
        self.sm_scale = 1.0 / math.sqrt(head_dim)

    def _check_prefill(self, q: Tensor, k: Tensor, row: int) -> int:
        if not 0 <= row < self.batch_size:
            raise IndexError(f"{self.method} cache: batch row {row} outside 0..{self.batch_size - 1}")
        t = k.shape[2]
        if t > self.max_seq_len:
            raise ValueError(f"{self.method} cache: prompt of {t} tokens exceeds max_seq_len {self.max_seq_len}")
        return t

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, row: int) -> Tensor:
        raise NotImplementedError

    def decode(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        raise NotImplementedError

    # prefill draft: a no-op for every cache but ZeroMerge with a lookahead
    def draft_steps(self) -> int:
        """Greedy draft tokens this cache wants decoded over the prompt it just prefilled before compressing it."""
        return 0

    def draft(self, q: Tensor, k: Tensor, v: Tensor, step: int) -> Tensor:
        """Attention output (1, H, 1, D) of draft token ``step`` (at position T + step) over the pending prompt."""
        raise RuntimeError(f"{self.method} cache: no draft pending (draft_steps() is 0)")

    def finish_prefill(self) -> None:
        """Called on every cache once the prompt's draft (if any) is done: compress what is pending."""

    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()

    def nbytes(self) -> int:
        """Bytes held by this cache's buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

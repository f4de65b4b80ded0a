"""The cache protocol: one ``nn.Module`` per layer that owns attention.

The model hands each layer's cache q, k, v after RoPE and gets the attention output back. It never asks which cache
it has: every method (full, zeromerge, h2o, streaming, snapkv) implements the same calls, with no-op defaults here
for what does not apply to it.

- ``prefill(q, k, v, row)``: q (1, H, T, D), k/v (1, Hkv, T, D) of one prompt at positions 0..T-1, stored into batch
  row ``row``; returns the causal attention output (1, H, T, D). Runs eagerly, once per prompt.
- ``draft_request()``, ``rescore(q, k, v, row)``, ``finish_prefill()``: a cache may want the prompts it just
  prefilled scored again by a short greedy draft (ZeroMerge's ``lookahead``; every other cache wants nothing, the
  default). Once every row is prefilled, the model asks every cache for ``draft_request()`` (row -> draft tokens),
  drafts that many tokens with the ordinary decode step (``snapshot()`` before and ``restore()`` after, so the draft
  leaves no trace in any cache), tells each cache where in the prompt a row's draft was looked up
  (``draft_source(row, spans)``), then runs each requesting row's draft through every layer, handing the layer's
  cache the draft's q/k/v in ``rescore`` (which returns their attention output), and finally calls
  ``finish_prefill`` on every cache. The draft is discarded: decoding starts at the prompt's end.
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
from collections.abc import Sequence

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
    def draft_request(self) -> dict[int, tuple[int, int]]:
        """Rows whose prompt this cache wants scored again by a draft: row -> (draft tokens, of which greedy; the
        rest looked up in the prompt, see ``Transformer.finish_prefill``)."""
        return {}

    def draft_source(self, row: int, spans: Sequence[tuple[int, int]]) -> None:
        """Where in the prompt ``row``'s draft was looked up: half-open ranges of prompt positions, the one its
        looked-up tokens were copied from first (``prompt_lookup_spans``), called before the row's ``rescore``;
        none when nothing was looked up. ZeroMerge's ``lookahead_pin`` keeps them."""

    def rescore(self, q: Tensor, k: Tensor, v: Tensor, row: int) -> Tensor:
        """Attention output (1, H, N, D) of ``row``'s draft tokens q (1, H, N, D), k/v (1, Hkv, N, D) at positions
        T .. T + N - 1, over the prompt and themselves; the cache uses their attention for the row."""
        raise RuntimeError(f"{self.method} cache: no draft was requested (draft_request() is empty)")

    def finish_prefill(self) -> None:
        """Called on every cache once the prompts' drafts (if any) are done."""

    def snapshot(self) -> list[Tensor] | None:
        """What ``restore`` needs to undo decode steps (the prefill draft's): a copy of every buffer."""
        return [b.clone() for b in self.buffers()]

    def restore(self, snap: list[Tensor] | None) -> None:
        if snap is not None:
            for b, saved in zip(self.buffers(), snap):
                b.copy_(saved)

    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()

    def nbytes(self) -> int:
        """Bytes held by this cache's buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

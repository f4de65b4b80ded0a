"""The full static KV cache: every token of every row, slot index = absolute position."""

from __future__ import annotations

import torch
from torch import Tensor

from zmzoo.cache.base import KVCache
from zmzoo.ops.decode_attention import decode_attention
from zmzoo.ops.prompt_attention import prompt_attention


class FullCache(KVCache):
    method = "full"

    def __init__(self, **kw):
        super().__init__(**kw)
        shape = (self.batch_size, self.n_kv_heads, self.max_seq_len, self.head_dim)
        dev = kw["device"]
        self.register_buffer("k", torch.zeros(shape, dtype=self.dtype, device=dev), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=self.dtype, device=dev), persistent=False)

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, row: int) -> Tensor:
        t = self._check_prefill(q, k, row)
        self.k[row, :, :t] = k[0]
        self.v[row, :, :t] = v[0]
        return prompt_attention(q, k, v, sliding_window=self.sliding_window, sm_scale=self.sm_scale)[0]

    def snapshot(self) -> None:
        """Nothing to copy: a decode step at position p writes slot p only, and decoding from the prompt's end T
        attends to slots below its position, so slots a draft wrote at T and beyond are overwritten before any read."""
        return None

    def decode(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        # slots [pos + 1 - window, pos) from the cache and the new token apart, which the op also writes into slot
        # pos (store_new): the Triton kernel inside its split kernel (no elementwise launch of its own), the reference
        # with an index_put_. The op derives the range from pos itself (no start/end tensors, which a compiled step
        # computed in two tiny kernels per attention launch and layer)
        window = self.sliding_window
        out, _ = decode_attention(q[:, :, 0], self.k, self.v, None, pos, k[:, :, 0], v[:, :, 0],
                                  window=window - 1 if window else None, sm_scale=self.sm_scale, store_new=True,
                                  backend=self.backend)
        return out.unsqueeze(2)

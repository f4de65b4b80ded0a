"""The cache protocol: one ``nn.Module`` per layer that owns attention.

The model hands each layer's cache q, k, v after RoPE and gets the attention output back:

- ``prefill(q, k, v, row)``: q (1, H, T, D), k/v (1, Hkv, T, D) of one prompt at positions 0..T-1, stored into batch
  row ``row``; returns the causal attention output (1, H, T, D). Runs eagerly, once per prompt.
- ``decode(q, k, v, pos)``: q (B, H, 1, D), k/v (B, Hkv, 1, D) of one new token per row at absolute positions
  ``pos`` (B,) (= tokens the row has seen before it); returns (B, H, 1, D). Static shapes, no host syncs, no Python
  branches on tensor values: ``torch.compile(fullgraph=True)`` and CUDA graphs capture it once.

Buffers are allocated once in ``__init__`` (``persistent=False``) and only ever written in place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def causal_attention(q: Tensor, k: Tensor, v: Tensor, sliding_window: int | None = None) -> Tensor:
    """Causal (optionally sliding-window) attention of a prompt: q (1, H, T, D), k/v (1, Hkv, T, D)."""
    t = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if sliding_window is None or t <= sliding_window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    i = torch.arange(t, device=q.device)
    mask = (i.view(-1, 1) >= i.view(1, -1)) & (i.view(-1, 1) - i.view(1, -1) < sliding_window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def causal_attention_lse(q: Tensor, k: Tensor, v: Tensor, sm_scale: float) -> tuple[Tensor, Tensor | None]:
    """``causal_attention`` plus each query's natural-log log-sum-exp (1, H, T) fp32, taken from the attention kernel
    that computes the output anyway, so that prompt scoring need not recompute it: on CUDA fp16/bf16 cuDNN's (what
    ``scaled_dot_product_attention`` picks on Hopper; the H200 ran a 40K prompt's layer in 22.8 ms with it against
    41.4 ms with the flash kernel, log-sum-exps equal to 4e-6), then the flash kernel's; on the CPU its flash kernel.
    Falls back to ``(causal_attention(q, k, v), None)`` wherever those kernels refuse the inputs (their checks run
    before any launch)."""
    aten = torch.ops.aten
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        kernels = [lambda: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=sm_scale)]
        if torch.backends.cuda.cudnn_sdp_enabled():
            kernels.insert(0, lambda: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                                               scale=sm_scale))
    elif q.device.type == "cpu":
        kernels = [lambda: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=sm_scale)]
    else:
        kernels = []
    for kernel in kernels:
        try:
            out, lse = kernel()[:2]
        except (RuntimeError, NotImplementedError):
            continue
        if out.shape == q.shape and lse.numel() == math.prod(q.shape[:3]):
            return out, lse.reshape(q.shape[:3])  # cuDNN's is (B, H, T, 1)
    return causal_attention(q, k, v), None


class KVCache(nn.Module):
    """Base class; subclasses set ``method`` and implement ``prefill`` and ``decode``."""

    method = "base"

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

    def reset(self) -> None:
        for buf in self.buffers():
            buf.zero_()

    def nbytes(self) -> int:
        """Bytes held by this cache's buffers."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

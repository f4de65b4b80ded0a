"""Causal attention of a prompt, optionally with each query's log-sum-exp, for the caches' ``prefill``.

The caches ask for what they need (the output, and the log-sum-exp when they score the prompt); which kernel gives
it is chosen here, by device and dtype, not by the cache:

- the output: ``F.scaled_dot_product_attention`` (causal, or with a sliding-window mask);
- with ``want_lse``: the kernel that computes the output anyway returns the log-sum-exp too, so prompt scoring need
  not recompute it: on CUDA fp16/bf16 cuDNN's (what ``scaled_dot_product_attention`` picks on Hopper; the H200 ran a
  40K prompt's layer in 22.8 ms with it against 41.4 ms with the flash kernel, log-sum-exps equal to 4e-6), then the
  flash kernel's; on the CPU its flash kernel. Where none of them takes the inputs (fp32 on CUDA, a sliding window
  shorter than the prompt) the log-sum-exp is None and the scoring computes its own (``ops.prefill_scores``): the
  same values, one more pass over q and k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_attention(q: Tensor, k: Tensor, v: Tensor, sliding_window: int | None = None,
                     sm_scale: float | None = None) -> Tensor:
    """Causal (optionally sliding-window) attention of a prompt: q (1, H, T, D), k/v (1, Hkv, T, D) -> (1, H, T, D).

    Traffic: reads q, k, v once, writes the output once (the kernels never form the T x T matrix)."""
    t = q.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if sliding_window is None or t <= sliding_window:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=sm_scale)
    i = torch.arange(t, device=q.device)
    mask = (i.view(-1, 1) >= i.view(1, -1)) & (i.view(-1, 1) - i.view(1, -1) < sliding_window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=sm_scale)


def _lse_kernels(q: Tensor, k: Tensor, v: Tensor, sm_scale: float) -> list:
    aten = torch.ops.aten
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16):
        kernels = [lambda: aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=sm_scale)]
        if torch.backends.cuda.cudnn_sdp_enabled():
            kernels.insert(0, lambda: aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False,
                                                                               scale=sm_scale))
        return kernels
    if q.device.type == "cpu":
        return [lambda: aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=sm_scale)]
    return []


def prompt_attention(q: Tensor, k: Tensor, v: Tensor, *, sliding_window: int | None = None,
                     sm_scale: float | None = None, want_lse: bool = False) -> tuple[Tensor, Tensor | None]:
    """The prompt's causal attention output (1, H, T, D) and, with ``want_lse``, each query's natural-log
    log-sum-exp (1, H, T) fp32 where a kernel returns it with the output (see the module docstring), else None.

    Args:
        q: (1, H, T, D) queries after RoPE; k, v: (1, Hkv, T, D), Hkv dividing H (GQA).
        sliding_window: attend only the last ``sliding_window`` positions (Mistral v0.1), None for all.
        sm_scale: the logit scale (default 1/sqrt(D)).
        want_lse: also return the log-sum-exp where it comes for free.
    """
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    t = q.shape[2]
    windowed = sliding_window is not None and t > sliding_window
    if want_lse and not windowed:
        for kernel in _lse_kernels(q, k, v, sm_scale):
            try:  # the kernels check their inputs before any launch
                out, lse = kernel()[:2]
            except (RuntimeError, NotImplementedError):
                continue
            if out.shape == q.shape and lse.numel() == math.prod(q.shape[:3]):
                return out, lse.reshape(q.shape[:3]).float()  # cuDNN's is (B, H, T, 1)
    return causal_attention(q, k, v, sliding_window, sm_scale), None

"""Matrix-vector products of a decode step: y = x @ w.T (+ b) for x of at most ``MAX_ROWS`` rows.

At batch 1 a decode step is bound by reading the weights, and on the H200 cuBLAS reads them at 2.6-3.8 TB/s
depending on the shape (``docs/results/profile-h200-zeromerge.txt``: the attention output projection, 4096 x 4096, in
12.9 us with a split-K reduce kernel of its own, 2.6 TB/s; gate|up, 22016 x 4096, at 3.8 TB/s), against a copy
bandwidth of 4.2 TB/s read + write. This kernel streams the weight once, row-tile by row-tile, with the few input rows
kept in registers: no split-K, no second kernel.

It is not used by the model yet: ``bench/ops.py`` times it against ``F.linear`` at LLaMA-2-7B's shapes, and it goes
into the decode step only where it is measured faster.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from zmzoo.ops._launch import launch, next_pow2

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; only backend='triton' needs it
    triton = tl = None

MAX_ROWS = 4  # more rows than this: F.linear (the product stops being a pure weight stream)
BLOCK_N = 16  # output features per program: N / 16 programs, 256-1376 at 7B widths, 2-10 per SM of an H200
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def gemv_ref(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """x (..., K), w (N, K), b (N,) or None -> (..., N): ``F.linear``."""
    return F.linear(x, w, b)


def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program p computes y[:, p*BLOCK_N : (p+1)*BLOCK_N] for all M rows: it reads its BLOCK_N weight rows once,
    BLOCK_K columns at a time, and accumulates products elementwise in fp32 (no tensor cores: M is 1-4), summing
    over K once at the end rather than with a cross-thread reduction per tile."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_K)
        acc += x[:, None, :] * w[None, :, :]
    y = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _gemv_impl(x: Tensor, w: Tensor, b: Optional[Tensor], num_warps: int, block_k: int) -> Tensor:  # noqa: UP045
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_m = next_pow2(m)
    launch(_gemv_kernel, (triton.cdiv(n, BLOCK_N),),
           x, w, b if b is not None else w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
           HAS_BIAS=b is not None,
           BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k, num_warps=num_warps, num_stages=3)
    return y


if triton is not None:
    # zmzoo::gemv(Tensor x, Tensor w, Tensor? b, int num_warps, int block_k) -> Tensor
    _gemv_op = torch.library.triton_op("zmzoo::gemv", _gemv_impl, mutates_args=())


def gemv_config(m: int) -> tuple[int, int]:
    """(num_warps, BLOCK_K): a (BLOCK_M x BLOCK_N x BLOCK_K) fp32 accumulator of 8K elements per program (64
    registers a thread at 4 warps)."""
    return 4, max(64, 8192 // (next_pow2(m) * BLOCK_N))


def gemv(x: Tensor, w: Tensor, b: Tensor | None = None, *, backend: str = "torch", num_warps: int | None = None,
         block_k: int | None = None) -> Tensor:
    """``F.linear(x, w, b)``; ``backend="triton"`` runs the kernel when x has at most ``MAX_ROWS`` rows (in all its
    leading dimensions) and falls back to ``F.linear`` otherwise."""
    if backend == "torch":
        return gemv_ref(x, w, b)
    if backend != "triton":
        raise ValueError(f"gemv backend {backend!r} is not 'torch' or 'triton'")
    if triton is None:
        raise RuntimeError("gemv backend='triton' needs the triton package")
    k = x.shape[-1]
    if w.dim() != 2 or w.shape[1] != k or (b is not None and tuple(b.shape) != (w.shape[0],)):
        raise ValueError(f"gemv: x {tuple(x.shape)}, w {tuple(w.shape)}, b "
                         f"{None if b is None else tuple(b.shape)} do not match (w must be (N, K), b (N,))")
    if x.dtype not in _DTYPES or w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        raise TypeError(f"gemv backend='triton' takes one dtype of {_DTYPES}, got x {x.dtype}, w {w.dtype}"
                        + (f", b {b.dtype}" if b is not None else ""))
    m = x.numel() // k if k else 0
    if m == 0 or m > MAX_ROWS:
        return gemv_ref(x, w, b)
    x2 = x.reshape(m, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if w.stride(-1) != 1:
        raise ValueError(f"gemv backend='triton': w needs unit stride along K, got strides {w.stride()}")
    nw, bk = gemv_config(m)
    y = torch.ops.zmzoo.gemv(x2, w, b, num_warps or nw, block_k or bk)
    return y.reshape(*x.shape[:-1], w.shape[0])

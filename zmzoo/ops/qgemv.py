"""Matrix-vector products of a decode step with a quantized weight: y = pro(x) @ dequantize(w).T (+ b) (+ residual).

``zmzoo.ops.gemv`` for weights in zmzoo's quantized layout (``zmzoo.ops.quant``): the same prologues (RMSNorm of the
input, SiLU gate of gate|up) and epilogues (bias, residual add), the same ``Config`` launch settings, tuned by the
same ``gemv.tune``. The kernel streams the integers and scales once, row-tile by row-tile, and dequantizes in
registers (fp32), so a step reads 1 byte (int8) or half a byte (int4) a weight plus the scales, instead of 2 (bf16):

- int8, one scale a row (zmzoo's ``quantize="int8"``): the integer products are summed in fp32 and scaled once a
  row at the end, as the RMSNorm's rsqrt is;
- int8 per group (GGUF Q8_0) and int4 (zmzoo's ``quantize="int4"``, GGUF Q4_0 / Q4_1): every element is dequantized
  with its group's scale (and zero) before its product. A 4-bit tile of BLOCK_K columns is BLOCK_K / 2 bytes a row;
  each byte's two nibbles are columns 16 apart (the chunked nibble order), multiplied by the matching x columns.

``qgemv_ref`` is the plain-torch composition: ``dequantize_ref`` to the activations' dtype, then ``gemv_ref``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from zmzoo.ops._launch import launch, next_pow2
from zmzoo.ops.gemv import _DTYPES, MAX_ROWS, Config, Split, _input_tile, gemv_config, gemv_ref, silu_mul
from zmzoo.ops.quant import QTensor, dequantize_ref

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; only backend='triton' needs it
    triton = tl = None


def _qt(w) -> QTensor:
    """A QTensor of ``w`` (a QTensor or a module carrying one, e.g. ``QuantLinear``)."""
    return w if isinstance(w, QTensor) else QTensor(w.q, w.scale, w.zero, w.group, w.bits)


def qgemv_ref(x: Tensor, w, b: Tensor | None = None, *, norm: Tensor | None = None, eps: float = 1e-6,
              silu: bool = False, residual: Tensor | None = None) -> Tensor:
    """``gemv_ref`` with the weight ``dequantize_ref(w, x.dtype)``: what the model computes without the kernel.
    Reads the quantized weight, writes and reads its dense copy (N K elements of x's dtype)."""
    return gemv_ref(x, dequantize_ref(_qt(w), x.dtype), b, norm=norm, eps=eps, silu=silu, residual=residual)


def qcomposite(x: Tensor, q: Tensor, scale: Tensor, zero: Optional[Tensor], norm: Optional[Tensor],  # noqa: UP045
               residual: Optional[Tensor], silu: bool, group: int, bits: int) -> Tensor:  # noqa: UP045
    """``qgemv_ref`` on a weight's tensors (what ``gemv.tune`` compiles and times as the torch composition)."""
    return qgemv_ref(x, QTensor(q, scale, zero, group, bits), norm=norm, silu=silu, residual=residual)


def _qgemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, g_ptr, r_ptr, y_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_rm, stride_ym, eps,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program p computes y[:, p*BLOCK_N : (p+1)*BLOCK_N] for all M rows, reading its BLOCK_N rows of integers once,
    BLOCK_K columns at a time (``_gemv_kernel``'s scheme). GROUP 0: one scale a row (8 bits only), applied after the
    sum over K; else the scale (and zero) of column c is at c // GROUP. 4 bits: BLOCK_K is a multiple of 32."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    rows = offs_n[:, None]
    if BITS == 8:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        sq = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # NORM: x^2 summed over the K steps
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < K
            mask_w = mask_n[:, None] & mask_k[None, :]
            w = tl.load(q_ptr + rows * stride_qn + offs_k[None, :], mask=mask_w, other=0).to(tl.float32)
            if GROUP > 0:  # dequantize with the group's scale (BLOCK_N, BLOCK_K)
                w = w * tl.load(s_ptr + rows * stride_sn + (offs_k // GROUP)[None, :], mask=mask_w,
                                other=0.0).to(tl.float32)
            x, x2 = _input_tile(x_ptr, g_ptr, offs_m, mask_m, stride_xm, offs_k, mask_k, K, SILU, NORM)
            if NORM:
                sq += x2
            acc += x[:, None, :] * w[None, :, :]
        y = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
        sq_sum = tl.sum(sq, axis=1)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
        sq = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # bytes of the tile
            mask_b = offs_b < K // 2
            col_lo = (offs_b // 16) * 32 + offs_b % 16  # the low nibble's column; the high one's is 16 further
            col_hi = col_lo + 16
            mask_w = mask_n[:, None] & mask_b[None, :]
            byte = tl.load(q_ptr + rows * stride_qn + offs_b[None, :], mask=mask_w, other=0).to(tl.int32)
            lo = (byte & 15).to(tl.float32)
            hi = (byte >> 4).to(tl.float32)
            s = tl.load(s_ptr + rows * stride_sn + (col_lo // GROUP)[None, :], mask=mask_w, other=0.0).to(tl.float32)
            if HAS_ZERO:  # w = scale * q + zero
                z = tl.load(z_ptr + rows * stride_sn + (col_lo // GROUP)[None, :], mask=mask_w,
                            other=0.0).to(tl.float32)
                w_lo = lo * s + z
                w_hi = hi * s + z
            else:  # w = scale * (q - 8)
                w_lo = (lo - 8.0) * s
                w_hi = (hi - 8.0) * s
            # (BLOCK_M, BLOCK_K // 2) each: the input at the low and the high nibbles' columns
            x_lo, x2_lo = _input_tile(x_ptr, g_ptr, offs_m, mask_m, stride_xm, col_lo, mask_b, K, SILU, NORM)
            x_hi, x2_hi = _input_tile(x_ptr, g_ptr, offs_m, mask_m, stride_xm, col_hi, mask_b, K, SILU, NORM)
            if NORM:
                sq += x2_lo + x2_hi
            acc += x_lo[:, None, :] * w_lo[None, :, :] + x_hi[:, None, :] * w_hi[None, :, :]
        y = tl.sum(acc, axis=2)
        sq_sum = tl.sum(sq, axis=1)
    if GROUP == 0:  # one scale a row
        y = y * tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if NORM:
        y = y * tl.rsqrt(sq_sum / K + eps)[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask_y = mask_m[:, None] & mask_n[None, :]
    if RESIDUAL:
        y += tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask_y, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask_y)


def _qgemv_impl(x: Tensor, q: Tensor, scale: Tensor, zero: Optional[Tensor], b: Optional[Tensor],  # noqa: UP045
                norm: Optional[Tensor], residual: Optional[Tensor], eps: float, silu: bool,  # noqa: UP045
                group: int, bits: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> Tensor:
    m = x.shape[0]
    n = q.shape[0]
    k = q.shape[1] * (8 // bits)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    launch(_qgemv_kernel, (triton.cdiv(n, block_n),),
           x, q, scale, zero if zero is not None else scale, b if b is not None else scale,
           norm if norm is not None else scale, residual if residual is not None else y, y,
           m, n, k, x.stride(0), q.stride(0), scale.stride(0), residual.stride(0) if residual is not None else 0,
           y.stride(0), eps, BITS=bits, GROUP=0 if scale.shape[1] == 1 and bits == 8 else group,
           HAS_ZERO=zero is not None, HAS_BIAS=b is not None, NORM=norm is not None, SILU=silu,
           RESIDUAL=residual is not None, BLOCK_M=next_pow2(m), BLOCK_N=block_n, BLOCK_K=block_k,
           num_warps=num_warps, num_stages=num_stages)
    return y


if triton is not None:
    # zmzoo::qgemv(Tensor x, Tensor q, Tensor scale, Tensor? zero, Tensor? b, Tensor? norm, Tensor? residual,
    #              float eps, bool silu, int group, int bits, int block_n, int block_k, int num_warps,
    #              int num_stages) -> Tensor
    _qgemv_op = torch.library.triton_op("zmzoo::qgemv", _qgemv_impl, mutates_args=())


def kernel_config(cfg: Config, bits: int) -> Config:
    """A launch setting as the kernel runs it: 4 bits need BLOCK_K a multiple of 32 (a nibble chunk), at least 64
    (BLOCK_K / 2 bytes a row, a power of two)."""
    return cfg._replace(block_k=max(64, cfg.block_k)) if bits == 4 else cfg


def _check(x: Tensor, w: QTensor, b: Tensor | None, norm: Tensor | None, silu: bool,
           residual: Tensor | None) -> None:
    if norm is not None and silu:
        raise ValueError("qgemv: norm and silu are two prologues for different products; pass one")
    n, k = w.shape
    width = x.shape[-1]
    if width != (2 * k if silu else k) or (b is not None and tuple(b.shape) != (n,)):
        raise ValueError(f"qgemv: x {tuple(x.shape)}, weight {(n, k)}, b {None if b is None else tuple(b.shape)} "
                         f"do not match (x (..., K){', 2K wide with silu' if silu else ''}, b (N,))")
    if norm is not None and tuple(norm.shape) != (k,):
        raise ValueError(f"qgemv: norm weight {tuple(norm.shape)} does not match x {tuple(x.shape)} (must be ({k},))")
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], n):
        raise ValueError(f"qgemv: residual {tuple(residual.shape)} does not match the output {(*x.shape[:-1], n)}")
    others = {"b": b, "norm": norm, "residual": residual}
    if x.dtype not in _DTYPES or any(t is not None and t.dtype != x.dtype for t in others.values()):
        raise TypeError(f"qgemv backend='triton' takes x, b, norm and residual in one dtype of {_DTYPES}, got x "
                        f"{x.dtype}, " + ", ".join(f"{a} {t.dtype}" for a, t in others.items() if t is not None))
    if any(t.stride(-1) != 1 for t in w.tensors()):
        raise ValueError("qgemv backend='triton': the quantized weight's tensors need unit stride along K")


def qgemv(x: Tensor, w, b: Tensor | None = None, *, norm: Tensor | None = None, eps: float = 1e-6,
          silu: bool = False, residual: Tensor | None = None, backend: str = "torch",
          config: Config | Split | None = None) -> Tensor:
    """``qgemv_ref`` (``backend="torch"``), or the kernel (``"triton"``) for x of at most ``MAX_ROWS`` rows (more run
    ``qgemv_ref``) at ``config`` (default ``gemv_config``; a ``Split`` computes the SiLU gate apart by torch). ``w``:
    a ``QTensor`` or a module carrying one (``QuantLinear``). The kernel dequantizes in fp32 and rounds once at the
    end; the reference rounds the dequantized weight to x's dtype first, so in low precision the two agree to that
    rounding, and in fp32 to the summation order."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"qgemv backend {backend!r} is not one of ('torch', 'triton')")
    fusion = dict(norm=norm, eps=eps, silu=silu, residual=residual)
    if backend == "torch":
        return qgemv_ref(x, w, b, **fusion)
    if triton is None:
        raise RuntimeError(f"qgemv backend={backend!r} needs the triton package")
    qt = _qt(w)
    _check(x, qt, b, norm, silu, residual)
    width = x.shape[-1]
    m = x.numel() // width if width else 0
    if m == 0 or m > MAX_ROWS:
        return qgemv_ref(x, qt, b, **fusion)
    if config is None:
        config = gemv_config(m)
    if isinstance(config, Split):
        x, silu, config = silu_mul(*x.chunk(2, dim=-1)), False, config.config
        width //= 2
    config = kernel_config(config, qt.bits)
    x2 = x.reshape(m, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = None
    if residual is not None:
        r2 = residual.reshape(m, qt.shape[0])
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    y = torch.ops.zmzoo.qgemv(x2, qt.q, qt.scale, qt.zero, b, norm, r2, float(eps), bool(silu), int(qt.group),
                              int(qt.bits), *config)
    return y.reshape(*x.shape[:-1], qt.shape[0])

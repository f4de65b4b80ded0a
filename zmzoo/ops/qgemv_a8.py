"""Decode-step products of a quantized weight by int8 activations (W4A8, W8A8): ``act_quant="int8"``.

``zmzoo.ops.qgemv`` multiplies the integers by the activations in fp32, so every weight element costs its
unpacking (a logical op and an exact add) and an FMA: 4.7-5.3 instructions a nibble in its SASS, which bounds its int4
products by the SMs' issue rate rather than by the bytes (docs/quantization.md). Here the activations are quantized
too, as llama.cpp's quantized mat-vec does (its Q8_1): per block of ``ACT_BLOCK`` = 32 columns (a weight chunk) to
int8 with one fp32 step ``dx = max |x| / 127`` and round-to-nearest, so the products become integer dot products of
4 bytes (``dp4a``: one instruction for 4 multiply-adds, exact in int32) and an element costs about 0.75 instructions.

What a product computes, per output n (``qgemv_a8_ref`` is this in plain torch):

- x' = the prologue of x in fp32: x, or silu(gate) * up (``silu``), or x * g (``norm``: the RMSNorm's weight; its
  rsqrt, a scalar a row, is applied to y at the end, as in ``zmzoo.ops.qgemv``, so x' is quantized without it);
- per block c of 32 columns: dx_c = max |x'_c| / 127, x^_i = floor(x'_i / dx_c + 1/2) in -127..127 (0 for a block
  of zeros), X^_c = sum x^_i (int), X_c = sum x'_i (fp32, exact inputs: the zero term below uses it);
- 4 bits: y = sum_g s_g sum_{c in g} dx_c (sum_{i in c} q_i x^_i - 8 X^_c) + z'_g sum_{c in g} X_c, with
  z' = zero + 8 s (0 for Q4_0): the weights centred (q - 8) so the activations' rounding errors meet small
  factors, the zero's term by the exact sums;
- 8 bits: y = s_n sum_c dx_c sum_{i in c} q_i x^_i (one scale a row), or sum_c s_{n,c} dx_c ... (GGUF Q8_0);
- then the norm's rsqrt(sum x'^2 / K + eps) (the squares before g), the bias and the residual, as ``_epilogue``.

The error against exact activations is the activations' rounding, |x'_i - dx_c x^_i| <= dx_c / 2 each: for a
product, at most sum_i |w~_i| dx_c(i) / 2 with w~ the centred weight (``a8_error_bound``; tests hold both the
reference and the kernel to it). For int4 weights this is small beside the weights' own error (a 4-bit step is
1/15 of a group's range, an 8-bit activation step 1/254 of a block's), for int8 weights comparable to it;
docs/quantization.md gives the measured ΔNLL.

Two ways to run a product, chosen per product by ``Config.fuse`` (``gemv.tune`` times both, ``a8_config`` is the
first):

- two kernels (fuse 0): ``_act_quant_kernel`` (x -> x^, dx, X^, X and the squares, one program per (row, 8 blocks))
  writes the quantized activations to memory, then ``_qgemv_a8_kernel`` (the integer products, split over K like
  ``_qgemv_kernel``, finished by its ``_qgemv_reduce``) reads them;
- one kernel (fuse 1): ``_qgemv_a8_kernel`` with FUSED reads x itself and every program quantizes the blocks of its
  K range as it goes, in registers (each step's BLOCK_K columns of its rows: the prologue, then ``_quantize``, the
  formula ``_act_quant_kernel`` uses too, then ``_pack_words``: x^ into the int32 words the dp4a loop reads), then
  runs the same loop and epilogue; a split's partial squares take the same path to ``_qgemv_reduce``. It saves the
  quantization's launch and the gap before the product at the cost of that recomputation (N / BLOCK_N programs each
  quantize their range) and of moving x^ into the products' layout in each step.

Both compute the same x^ (the same operations in the same order on the same x'), and under the interpreter the same
results bit for bit (tests/ops/test_qgemv_a8.py); compiled, the blocks' fp32 sums (X, the squares) may differ in
their last bits, summed in another order across threads. Under Triton's interpreter (``TRITON_INTERPRET=1``, CPU tests)
``dp4a`` is emulated with shifts and integer products (the interpreter runs no inline PTX): the same integers, so the
same sums; on CUDA it is one ``dp4a`` instruction, which only the GPU tests reach.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from zmzoo.ops._launch import launch, next_pow2
from zmzoo.ops.gemv import MAX_ROWS, Config, _epilogue, _input_at, for_rows
from zmzoo.ops.qgemv import REDUCE_BLOCK, _check, _qgemv_reduce, _qt
from zmzoo.ops.quant import QTensor, unpack_int4

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; only backend='triton' needs it
    triton = tl = None

ACT_BLOCK = 32  # columns per activation scale (one weight chunk; llama.cpp's Q8_1 block)
ACT_QUANT = (None, "int8")
QUANT_BLOCKS = 8  # activation blocks one program of _act_quant_kernel quantizes


class ActQ(NamedTuple):
    """A row block of activations quantized per ``ACT_BLOCK`` columns (``quantize_act``): M rows, C = K / 32 blocks."""
    xq: Tensor  # int8 (M, K): x^
    dx: Tensor  # fp32 (M, C): each block's step
    xsum_q: Tensor  # int32 (M, C): sum of x^ in a block
    xsum: Tensor  # fp32 (M, C): sum of x' in a block (exact inputs)
    sq: Tensor  # fp32 (M, C): sum of x'^2 before the norm weight (the RMSNorm's statistics)


def check_act_quant(act_quant: str | None) -> None:
    if act_quant not in ACT_QUANT:
        raise ValueError(f"act_quant={act_quant!r} is not one of {ACT_QUANT} (None: the activations stay in the "
                         "compute dtype; 'int8': quantized per 32 columns for the quantized products)")


def _prologue_f32(x: Tensor, norm: Tensor | None, silu: bool) -> tuple[Tensor, Tensor]:
    """x' in fp32 (as the kernel computes it) and the squares the norm's statistics sum (before the norm weight)."""
    xf = x.float()
    if silu:
        gate, up = xf.chunk(2, dim=-1)
        xf = gate / (1.0 + torch.exp(-gate)) * up
    x2 = xf * xf
    if norm is not None:
        xf = xf * norm.float()
    return xf, x2


def quantize_act_ref(x: Tensor, norm: Tensor | None = None, silu: bool = False) -> ActQ:
    """x (M, K) (or (M, 2K) gate|up with ``silu``) quantized per 32 columns after its prologue (module docstring)."""
    xf, x2 = _prologue_f32(x, norm, silu)
    m, k = xf.shape
    if k % ACT_BLOCK:
        raise ValueError(f"act_quant='int8' needs the product's input width to be a multiple of {ACT_BLOCK}, got {k}")
    xb = xf.reshape(m, k // ACT_BLOCK, ACT_BLOCK)
    amax = xb.abs().amax(-1)
    inv = torch.where(amax > 0, 127.0 / amax.clamp_min(1e-30), torch.zeros_like(amax))
    v = torch.floor(xb * inv[..., None] + 0.5).clamp(-127, 127)
    return ActQ(v.to(torch.int8).reshape(m, k), amax / 127.0, v.sum(-1).to(torch.int32), xb.sum(-1),
                x2.reshape(m, k // ACT_BLOCK, ACT_BLOCK).sum(-1))


def centred(w: QTensor) -> tuple[Tensor, Tensor | None]:
    """The weight as ``qgemv_a8`` splits it, in fp32: the integer part (N, K) (``s (q - 8)`` for 4 bits, ``s q`` for 8
    bits with per-group scales, ``q`` with one scale a row) and z' (N, K / group) (zero + 8 s; None without a zero)."""
    n, k = w.shape
    if w.bits == 8:
        q = w.q.float()
        if w.scale.shape[1] == 1:
            return q, None
        return (q.reshape(n, -1, w.group) * w.scale.float()[..., None]).reshape(n, k), None
    q = unpack_int4(w.q).float() - 8
    wc = (q.reshape(n, -1, w.group) * w.scale.float()[..., None]).reshape(n, k)
    return wc, None if w.zero is None else w.zero.float() + 8 * w.scale.float()


def qgemv_a8_from(a: ActQ, w, b: Tensor | None = None, *, eps: float = 1e-6, norm: bool = False,
                  residual: Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """The product of already quantized activations ``a`` by ``w`` in plain torch, fp32 (module docstring)."""
    w = _qt(w)
    m, k = a.xq.shape
    wc, zp = centred(w)
    xh = (a.xq.float().reshape(m, -1, ACT_BLOCK) * a.dx[..., None]).reshape(m, k)  # dx_c x^_i
    y = xh @ wc.T
    if zp is not None:
        y = y + a.xsum.reshape(m, -1, w.group // ACT_BLOCK).sum(-1) @ zp.T
    if w.bits == 8 and w.scale.shape[1] == 1:
        y = y * w.scale.float()[:, 0]
    if norm:
        y = y * torch.rsqrt(a.sq.sum(-1, keepdim=True) / k + eps)
    if b is not None:
        y = y + b.float()
    if residual is not None:
        y = y + residual.float()
    return y.to(out_dtype)


def qgemv_a8_ref(x: Tensor, w, b: Tensor | None = None, *, norm: Tensor | None = None, eps: float = 1e-6,
                 silu: bool = False, residual: Tensor | None = None) -> Tensor:
    """``quantize_act_ref`` then ``qgemv_a8_from``: what the kernels compute, in plain torch (fp32, rounded once to
    x's dtype). x (..., K) or (..., 2K) with ``silu``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    r2 = None if residual is None else residual.reshape(x2.shape[0], -1)
    y = qgemv_a8_from(quantize_act_ref(x2, norm, silu), w, b, eps=eps, norm=norm is not None, residual=r2,
                      out_dtype=x.dtype)
    return y.reshape(*lead, y.shape[-1])


def a8_composite(x: Tensor, q: Tensor, scale: Tensor, zero: Optional[Tensor], norm: Optional[Tensor],  # noqa: UP045
                 residual: Optional[Tensor], silu: bool, group: int, bits: int) -> Tensor:  # noqa: UP045
    """``qgemv_a8_ref`` on a weight's tensors (what ``gemv.tune`` compiles and times as the torch composition)."""
    return qgemv_a8_ref(x, QTensor(q, scale, zero, group, bits), norm=norm, silu=silu, residual=residual)


def a8_error_bound(x: Tensor, w, *, norm: Tensor | None = None, eps: float = 1e-6, silu: bool = False) -> Tensor:
    """(M, N): the most the activations' rounding can move each output from the product with exact activations,
    sum_i |w~_i| dx_c(i) / 2 (w~: ``centred``'s integer part, times the row scale for int8 per channel), times the
    norm's rsqrt."""
    w = _qt(w)
    x2 = x.reshape(-1, x.shape[-1])
    a = quantize_act_ref(x2, norm, silu)
    wc, _ = centred(w)
    if w.bits == 8 and w.scale.shape[1] == 1:
        wc = wc * w.scale.float()
    m, k = a.xq.shape
    half = (a.dx / 2).repeat_interleave(ACT_BLOCK, dim=1)  # (M, K)
    bound = half @ wc.abs().T
    if norm is not None:
        bound = bound * torch.rsqrt(a.sq.sum(-1, keepdim=True) / k + eps)
    return bound


# ---------------------------------------------------------------------------------------------------- the kernels


def _dp4a(a, b, c, SIGNED_A: tl.constexpr, ASM: tl.constexpr):
    """c + the dot product of the 4 bytes of int32 words ``a`` and ``b`` (b's bytes signed; a's signed or not): one
    ``dp4a`` instruction on CUDA (``ASM``), shifts and products under the interpreter (the same integers)."""
    if ASM:
        if SIGNED_A:
            return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                             dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise("dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                                         dtype=tl.int32, is_pure=True, pack=1)
    out = c
    for i in tl.static_range(4):
        if SIGNED_A:
            ai = (a << (24 - 8 * i)) >> 24
        else:
            ai = (a >> (8 * i)) & 0xFF
        out += ai * ((b << (24 - 8 * i)) >> 24)
    return out


def _ld(ptrs, mask, NOMASK: tl.constexpr):
    """``tl.load`` of ``ptrs``, zero where ``mask`` is off (``NOMASK``: every one is in range, the mask unused)."""
    if NOMASK:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=0)


def _quarters(t, D1: tl.constexpr, D2: tl.constexpr):
    """The 4 words of a (D0, D1, D2, 4) tile's last dimension, as four (D0, D1, D2) tiles."""
    a, b = tl.split(tl.reshape(t, (t.shape[0], D1, D2, 2, 2)))  # words (0, 2) and (1, 3)
    w0, w2 = tl.split(a)
    w1, w3 = tl.split(b)
    return w0, w1, w2, w3


def _quantize(x, AXIS: tl.constexpr):
    """``quantize_act_ref`` of a tile of x' in fp32 whose ``AXIS`` runs over a block's 32 columns: x^ (int32, in
    -127..127), and per block dx, X^ and X (the tile without ``AXIS``). The one formula both ways of quantizing use
    (``_act_quant_kernel``, ``_qgemv_a8_kernel``'s FUSED branch), so the two give the same integers."""
    amax = tl.max(tl.abs(x), axis=AXIS)
    inv = tl.where(amax > 0, 127.0 / tl.maximum(amax, 1e-30), 0.0)
    v = tl.floor(x * tl.expand_dims(inv, AXIS) + 0.5)
    vi = tl.minimum(tl.maximum(v, -127.0), 127.0).to(tl.int32)
    return vi, amax / 127.0, tl.sum(vi, axis=AXIS), tl.sum(x, axis=AXIS)


def _act_quant_kernel(x_ptr, g_ptr, xq_ptr, dx_ptr, xsq_ptr, xs_ptr, sq_ptr, K, stride_xm,
                      NORM: tl.constexpr, SILU: tl.constexpr, CB: tl.constexpr):
    """Program (m, p) quantizes blocks [p CB, (p + 1) CB) of row m (``quantize_act_ref``); K a multiple of 32."""
    m = tl.program_id(0)
    p = tl.program_id(1)
    C = K // 32
    blk = p * CB + tl.arange(0, CB)
    cols = blk[:, None] * 32 + tl.arange(0, 32)[None, :]
    mb = blk < C
    mask = mb[:, None]
    x, x2 = _input_at(x_ptr + m * stride_xm + cols, g_ptr + cols, mask, mask, K, SILU, NORM)
    vi, dx, xsq, xs = _quantize(x, 1)
    tl.store(xq_ptr + m * K + cols, vi.to(tl.int8), mask=mask)
    tl.store(dx_ptr + m * C + blk, dx, mask=mb)
    tl.store(xsq_ptr + m * C + blk, xsq, mask=mb)
    tl.store(xs_ptr + m * C + blk, xs, mask=mb)
    tl.store(sq_ptr + m * C + blk, tl.sum(x2, axis=1), mask=mb)


def _pack_words(vi, D1: tl.constexpr):
    """x^ (D0, D1, 32) int32 -> its 8 words a block as ``_act_quant_kernel`` stores them (word j: columns 4j..4j+3,
    column 4j + b in byte b, signed bytes, little-endian), as two (D0, D1, 1, 4) tiles: words [0, 4) and [4, 8), the
    tiles ``_qgemv_a8_kernel`` loads x^'s words in."""
    D0: tl.constexpr = vi.shape[0]
    b0, b1, b2, b3 = _quarters(tl.reshape(vi, (D0, D1, 8, 4)), D1, 8)  # (D0, D1, 8): byte b of each word
    words = (b0 & 0xFF) | ((b1 & 0xFF) << 8) | ((b2 & 0xFF) << 16) | (b3 << 24)
    lo, hi = tl.split(tl.permute(tl.reshape(words, (D0, D1, 2, 4)), (0, 1, 3, 2)))
    return tl.reshape(lo, (D0, D1, 1, 4)), tl.reshape(hi, (D0, D1, 1, 4))


def _qgemv_a8_kernel(
    x_ptr, g_ptr, xq_ptr, dx_ptr, xsq_ptr, xs_ptr, sq_ptr, q_ptr, s_ptr, z_ptr, b_ptr, r_ptr, y_ptr, p_ptr, psq_ptr,
    M, N, K, KT, stride_xm, stride_qn, stride_sn, stride_rm, stride_ym, eps,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr,
    SILU: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr, FULL: tl.constexpr, SPLIT: tl.constexpr, FUSED: tl.constexpr, ASM: tl.constexpr,
):
    """Program (p, s) computes y[:, p BLOCK_N : (p+1) BLOCK_N] over columns [s R, (s+1) R), R = KT BLOCK_K, as
    ``zmzoo.ops.qgemv._qgemv_kernel`` does (SPLIT > 1: partial sums for ``_qgemv_reduce``), from the activations
    quantized by ``_act_quant_kernel`` (``xq_ptr`` an int32 view of x^: 8 words a block) or, ``FUSED``, from x
    itself (``x_ptr``, ``g_ptr``: the norm weight; rows of ``stride_xm``, gate|up with ``SILU``): each step quantizes
    the NC blocks it multiplies, with ``_act_quant_kernel``'s prologue and formula (``_input_at``, ``_quantize``),
    and packs x^ into the same words in registers (``_pack_words``), so the loop below runs on the same integers; the
    squares of a split's range reach ``_qgemv_reduce`` through ``psq_ptr`` as the loaded ones do. Tiles are
    (BLOCK_M, NC, BLOCK_N, 4): NC = BLOCK_K / 32 blocks, 4 words of a block of one weight row a thread (4 bits: word
    j of block c holds bytes 16c + 4j .. +3, columns 32c + 4j + b in their low nibbles and 16 further in the high
    ones; 8 bits: a block's 8 words, columns 32c + 4j + b, as two tiles). A block's integer dot product, the dp4a of
    each word with the activations' word at its columns chained over the block's words, is exact; it is scaled once
    per (row, block): dx_c, then the group's scale (and z' times the block's exact sum)."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_lo = pid_k * KT * BLOCK_K
    k_hi = tl.minimum(K, k_lo + KT * BLOCK_K)
    C = K // 32
    XW = K // 4  # words of a row of x^
    NC: tl.constexpr = BLOCK_K // 32
    WB: tl.constexpr = 4 if BITS == 4 else 8  # words of a block of a weight row
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    blk3 = tl.arange(0, NC)[None, :, None]  # (1, NC, 1): block of the tile
    m3 = offs_m[:, None, None]
    rows3 = offs_n[None, None, :]
    blk4 = blk3[:, :, :, None]
    j4 = tl.arange(0, 4)[None, None, None, :]
    # (1, NC, BLOCK_N, 4) words of the weights, (BLOCK_M, NC, 1, 4) of x^: 4 words (16 bytes) a thread; 8 bits read
    # a block's 8 words as two such tiles, words [0, 4) and [4, 8)
    q_ptrs = q_ptr + rows3[:, :, :, None] * stride_qn + blk4 * WB + j4
    x_ptrs = xq_ptr + m3[:, :, :, None] * XW + blk4 * 8 + j4
    a_offs = m3 * C + blk3  # (BLOCK_M, NC, 1): the blocks' statistics
    s_rows = rows3 * stride_sn
    cols3 = blk3 * 32 + tl.arange(0, 32)[None, None, :]  # FUSED: (1, NC, 32) the step's columns of x, from k0
    xf_ptrs = x_ptr + m3 * stride_xm + cols3
    # masks: None where FULL (N a multiple of BLOCK_N, M = BLOCK_M) and EVEN_K leave nothing out of range
    mask_w = mask_n[None, None, :, None]
    mask_x = mask_m[:, None, None, None]
    mask_a = mask_m[:, None, None]
    mask_s = mask_n[None, None, :]
    NOMASK: tl.constexpr = FULL and EVEN_K  # nothing out of range: the loads take no mask
    acc = tl.zeros((BLOCK_M, NC, BLOCK_N), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M, NC), dtype=tl.float32)
    zero = tl.zeros((BLOCK_M, NC, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        c0 = k0 // 32
        if EVEN_K:
            mw = mask_w
            mx = mask_x
            ma = mask_a
            ms = mask_s
        else:  # blocks past k_hi read nothing
            ok3 = (k0 + blk3 * 32) < k_hi
            mw = mask_w & ok3[:, :, :, None]
            mx = mask_x & ok3[:, :, :, None]
            ma = mask_a & ok3
            ms = mask_s & ok3
        if FUSED:  # x^, its words and the blocks' statistics (BLOCK_M, NC, 1) from x, as _act_quant_kernel does
            if NOMASK:  # (the norm weight's columns are all in range where EVEN_K)
                xv, xv2 = _input_at(xf_ptrs + k0, g_ptr + k0 + cols3, None, None, K, SILU, NORM)
            elif EVEN_K:
                xv, xv2 = _input_at(xf_ptrs + k0, g_ptr + k0 + cols3, ma, None, K, SILU, NORM)
            else:
                xv, xv2 = _input_at(xf_ptrs + k0, g_ptr + k0 + cols3, ma, ok3, K, SILU, NORM)
            vi, dx, xsq, xs = _quantize(xv, 2)
            xw, xh = _pack_words(vi, NC)
            dx = dx[:, :, None]
            xsq = xsq[:, :, None]
            xs = xs[:, :, None]
            if NORM:
                sq_c = tl.sum(xv2, axis=2)
            # the weights' words loaded after x: Triton's layout pass then moves x^'s small tiles (its words and
            # statistics) into the products' layout; loaded first, the (BLOCK_M, NC, BLOCK_N) products moved into
            # the statistics' layout and back, twice a step (SASS of bench/probes/qgemv_sass.py, sm_90)
            w = _ld(q_ptrs + c0 * WB, mw, NOMASK)
        else:  # x^'s words as _act_quant_kernel stored them (its statistics are loaded where they are used)
            w = _ld(q_ptrs + c0 * WB, mw, NOMASK)
            xw = _ld(x_ptrs + c0 * 8, mx, NOMASK)
            xh = _ld(x_ptrs + c0 * 8 + 4, mx, NOMASK)
        x0, x1, x2, x3 = _quarters(xw, NC, 1)
        y0, y1, y2, y3 = _quarters(xh, NC, 1)
        # the block's dot product chained through dp4a's accumulator word by word (a thread holds the 4 words of
        # a tile's row and block: taking them apart moves nothing between threads)
        if BITS == 4:
            lo = w & 0x0F0F0F0F  # 4 low nibbles: q at the word's 4 columns (those of x^'s word j)
            hi = w ^ lo  # 4 high nibbles in place: 16 q at the columns 16 further (x^'s word 4 + j)
            w0, w1, w2, w3 = _quarters(lo, NC, BLOCK_N)
            h0, h1, h2, h3 = _quarters(hi, NC, BLOCK_N)
            dl = _dp4a(w0, x0, zero, False, ASM)
            dl = _dp4a(w3, x3, _dp4a(w2, x2, _dp4a(w1, x1, dl, False, ASM), False, ASM), False, ASM)
            dh = _dp4a(h0, y0, zero, False, ASM)
            dh = _dp4a(h3, y3, _dp4a(h2, y2, _dp4a(h1, y1, dh, False, ASM), False, ASM), False, ASM)
            d = dl + (dh >> 4)
            d -= 8 * (xsq if FUSED else _ld(xsq_ptr + a_offs + c0, ma, NOMASK))  # the weights centred: q - 8
        else:
            v = _ld(q_ptrs + c0 * WB + 4, mw, NOMASK)
            w0, w1, w2, w3 = _quarters(w, NC, BLOCK_N)
            v0, v1, v2, v3 = _quarters(v, NC, BLOCK_N)
            d = _dp4a(w0, x0, zero, True, ASM)
            d = _dp4a(w3, x3, _dp4a(w2, x2, _dp4a(w1, x1, d, True, ASM), True, ASM), True, ASM)
            d = _dp4a(v0, y0, d, True, ASM)
            d = _dp4a(v3, y3, _dp4a(v2, y2, _dp4a(v1, y1, d, True, ASM), True, ASM), True, ASM)
        t = d.to(tl.float32) * (dx if FUSED else _ld(dx_ptr + a_offs + c0, ma, NOMASK))  # (BLOCK_M, NC, BLOCK_N)
        if GROUP == 0:
            acc += t
        else:
            s_offs = s_rows + (k0 + blk3 * 32) // GROUP
            s = _ld(s_ptr + s_offs, ms, NOMASK).to(tl.float32)
            acc += t * s
            if HAS_ZERO:
                zp = _ld(z_ptr + s_offs, ms, NOMASK).to(tl.float32) + 8.0 * s
                acc += (xs if FUSED else _ld(xs_ptr + a_offs + c0, ma, NOMASK)) * zp
        if NORM:
            sq += sq_c if FUSED else tl.sum(_ld(sq_ptr + a_offs + c0, ma, NOMASK), axis=2)
    y = tl.sum(acc, axis=1)
    sq_sum = tl.sum(sq, axis=1)
    if SPLIT > 1:
        mask_y = mask_m[:, None] & mask_n[None, :]
        tl.store(p_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], y, mask=mask_y)
        if NORM:
            if pid == 0:
                tl.store(psq_ptr + pid_k * M + offs_m, sq_sum, mask=mask_m)
    else:
        _epilogue(y, sq_sum, offs_m, offs_n, mask_m, mask_n, s_ptr, stride_sn, b_ptr, r_ptr, stride_rm, y_ptr,
                  stride_ym, K, eps, GROUP == 0, NORM, HAS_BIAS, RESIDUAL)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def quantize_act(x: Tensor, norm: Optional[Tensor], silu: bool) -> ActQ:  # noqa: UP045
    """``quantize_act_ref`` by ``_act_quant_kernel`` (x (M, K) contiguous rows, or (M, 2K) with ``silu``)."""
    m = x.shape[0]
    k = x.shape[1] // 2 if silu else x.shape[1]
    c = k // ACT_BLOCK
    dev = x.device
    xq = torch.empty((m, k), dtype=torch.int8, device=dev)
    dx = torch.empty((m, c), dtype=torch.float32, device=dev)
    xsq = torch.empty((m, c), dtype=torch.int32, device=dev)
    xs = torch.empty((m, c), dtype=torch.float32, device=dev)
    sq = torch.empty((m, c), dtype=torch.float32, device=dev)
    launch(_act_quant_kernel, (m, triton.cdiv(c, QUANT_BLOCKS)), x, norm if norm is not None else dx, xq, dx, xsq,
           xs, sq, k, x.stride(0), NORM=norm is not None, SILU=silu, CB=QUANT_BLOCKS, num_warps=1)
    return ActQ(xq, dx, xsq, xs, sq)


def qgemv_a8_launch(a: ActQ, q: Tensor, scale: Tensor, zero: Optional[Tensor], b: Optional[Tensor],  # noqa: UP045
                    norm: bool, residual: Optional[Tensor], eps: float, group: int, bits: int,  # noqa: UP045
                    block_n: int, block_k: int, num_warps: int, num_stages: int, split: int = 1,
                    out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The product of activations already quantized (``quantize_act``) by ``_qgemv_a8_kernel`` (and
    ``_qgemv_reduce`` when split): ``qgemv_a8_from`` on the GPU. Apart from ``_qgemv_a8_impl`` so the probes can
    time the product without the quantization."""
    return _product(None, a, q, scale, zero, b, None, norm, residual, eps, False, group, bits, block_n, block_k,
                    num_warps, num_stages, split, out_dtype)


def qgemv_a8_fused_launch(x: Tensor, q: Tensor, scale: Tensor, zero: Optional[Tensor],  # noqa: UP045
                          b: Optional[Tensor], norm: Optional[Tensor], residual: Optional[Tensor],  # noqa: UP045
                          eps: float, silu: bool, group: int, bits: int, block_n: int, block_k: int, num_warps: int,
                          num_stages: int, split: int = 1) -> Tensor:
    """The whole product in one launch (``_qgemv_a8_kernel`` with FUSED: each program quantizes the blocks of x it
    multiplies; ``_qgemv_reduce`` after it when split): x (M, K) contiguous rows, or (M, 2K) with ``silu``."""
    return _product(x, None, q, scale, zero, b, norm, norm is not None, residual, eps, silu, group, bits, block_n,
                    block_k, num_warps, num_stages, split, x.dtype)


def _product(x: Tensor | None, a: ActQ | None, q: Tensor, scale: Tensor, zero: Tensor | None, b: Tensor | None,
             g: Tensor | None, norm: bool, residual: Tensor | None, eps: float, silu: bool, group: int, bits: int,
             block_n: int, block_k: int, num_warps: int, num_stages: int, split: int,
             out_dtype: torch.dtype) -> Tensor:
    """``_qgemv_a8_kernel`` on quantized activations ``a`` or (``a`` None: FUSED) on x with its prologue (``g``
    the norm weight, ``silu``)."""
    fused = a is None
    m, k = (x.shape[0], x.shape[1] // (2 if silu else 1)) if fused else a.xq.shape
    n = q.shape[0]
    dev = q.device
    y = torch.empty((m, n), dtype=out_dtype, device=dev)
    row_scale = scale.shape[1] == 1 and bits == 8
    if q.stride(0) * q.element_size() % 4 or q.storage_offset() * q.element_size() % 4:
        q = q.clone(memory_format=torch.contiguous_format)
    kt = max(1, triton.cdiv(triton.cdiv(k, max(1, split)), block_k))
    splits = max(1, triton.cdiv(k, kt * block_k))
    partial = psq = y
    if splits > 1:
        partial = torch.empty((splits, m, n), dtype=torch.float32, device=dev)
        psq = torch.empty((splits, m), dtype=torch.float32, device=dev)
    if fused:  # the activations' pointers of the unfused kernel unused (any tensor)
        acts = (x, g if g is not None else x, scale, scale, scale, scale, scale)
    else:  # x and the norm weight unused
        acts = (a.dx, a.dx, a.xq.view(torch.int32), a.dx, a.xsum_q, a.xsum, a.sq)
    launch(_qgemv_a8_kernel, (triton.cdiv(n, block_n), splits),
           *acts, q.view(torch.int32), scale, zero if zero is not None else scale, b if b is not None else scale,
           residual if residual is not None else y, y, partial, psq,
           m, n, k, kt, x.stride(0) if fused else 0, q.stride(0) * q.element_size() // 4, scale.stride(0),
           residual.stride(0) if residual is not None else 0, y.stride(0), eps,
           BITS=bits, GROUP=0 if row_scale else group, HAS_ZERO=zero is not None, HAS_BIAS=b is not None,
           NORM=norm, SILU=silu and fused, RESIDUAL=residual is not None, BLOCK_M=next_pow2(m), BLOCK_N=block_n,
           BLOCK_K=block_k, EVEN_K=k % block_k == 0,
           FULL=n % block_n == 0 and m == next_pow2(m), SPLIT=splits, FUSED=fused, ASM=not _interpreting(),
           num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        launch(_qgemv_reduce, (triton.cdiv(n, REDUCE_BLOCK),), partial, psq, scale, b if b is not None else scale,
               residual if residual is not None else y, y, m, n, k, splits, scale.stride(0),
               residual.stride(0) if residual is not None else 0, y.stride(0), eps, ROW_SCALE=row_scale,
               HAS_BIAS=b is not None, NORM=norm, RESIDUAL=residual is not None, BLOCK_M=next_pow2(m),
               BLOCK_N=REDUCE_BLOCK, num_warps=4)
    return y


def _qgemv_a8_impl(x: Tensor, q: Tensor, scale: Tensor, zero: Optional[Tensor], b: Optional[Tensor],  # noqa: UP045
                   norm: Optional[Tensor], residual: Optional[Tensor], eps: float, silu: bool,  # noqa: UP045
                   group: int, bits: int, block_n: int, block_k: int, num_warps: int, num_stages: int,
                   split: int = 1, fuse: int = 0) -> Tensor:
    if fuse:
        return qgemv_a8_fused_launch(x, q, scale, zero, b, norm, residual, eps, silu, group, bits, block_n, block_k,
                                     num_warps, num_stages, split)
    return qgemv_a8_launch(quantize_act(x, norm, silu), q, scale, zero, b, norm is not None, residual, eps, group,
                           bits, block_n, block_k, num_warps, num_stages, split, out_dtype=x.dtype)


if triton is not None:
    _dp4a = triton.jit(_dp4a)
    _quarters = triton.jit(_quarters)
    _ld = triton.jit(_ld)
    _quantize = triton.jit(_quantize)
    _pack_words = triton.jit(_pack_words)
    # zmzoo::qgemv_a8(Tensor x, Tensor q, Tensor scale, Tensor? zero, Tensor? b, Tensor? norm, Tensor? residual,
    #                 float eps, bool silu, int group, int bits, int block_n, int block_k, int num_warps,
    #                 int num_stages, int split=1, int fuse=0) -> Tensor: zmzoo::qgemv's signature and ``fuse``
    _qgemv_a8_op = torch.library.triton_op("zmzoo::qgemv_a8", _qgemv_a8_impl, mutates_args=())


# Launch settings gemv.tune tries (at 1 row; ``for_rows`` shrinks BLOCK_K at more). A thread holds a row's WC words of
# one block (16 bytes at 4 bits, 32 at 8) and its 8 words of activations, reused for the R = BLOCK_N * NC / (32 *
# num_warps) rows it holds. Each is tried both ways (``Config.fuse``): after the quantization kernel, and fused, which
# saves that launch and the gap before the product (1.7-6.9 us a product on the H200) but has every program quantize
# the blocks it multiplies (each step: x's BLOCK_M x BLOCK_K tile spread over the program's threads, then x^'s words
# and statistics moved into the products' layout through shared memory: in the SASS for sm_90, Triton 3.9, at 1 row,
# 4 to 14 barriers a step, no spills, and 1.5-2.4 instructions a weight element at 4 bits against 1.15-1.4 unfused,
# 1.0-2.3 at 8 bits against 0.53-0.58 unfused (0.66-2.41 at BLOCK_N = 32): bench/probes/qgemv_sass.py --kernel a8);
# which is faster per product is for the GPU to say.
_A8_INT4 = (
    Config(32, 512, 4, 1), Config(64, 512, 4, 1), Config(64, 1024, 8, 1), Config(128, 512, 8, 1),
    Config(32, 512, 4, 1, 4), Config(64, 512, 4, 1, 4), Config(64, 512, 4, 1, 8), Config(128, 256, 4, 1, 8),
    Config(128, 512, 8, 1, 4),
)
_A8_INT8 = (
    Config(32, 256, 4, 1), Config(64, 256, 4, 1), Config(64, 512, 8, 1),
    Config(32, 256, 4, 1, 4), Config(64, 256, 4, 1, 2), Config(64, 256, 4, 1, 4), Config(32, 512, 4, 1, 8),
)
A8_INT4_CANDIDATES = _A8_INT4 + tuple(c._replace(fuse=1) for c in _A8_INT4)
A8_INT8_CANDIDATES = _A8_INT8 + tuple(c._replace(fuse=1) for c in _A8_INT8)


def a8_candidates(bits: int) -> tuple[Config, ...]:
    return A8_INT4_CANDIDATES if bits == 4 else A8_INT8_CANDIDATES


def a8_config(m: int, bits: int) -> Config:
    """The untuned setting at ``m`` rows (unfused; ``gemv.tune`` picks the fused kernel where it measures faster)."""
    return for_rows(Config(64, 512, 4, 1) if bits == 4 else Config(64, 256, 4, 1), m)


def a8_kernel_config(cfg: Config) -> Config:
    """BLOCK_K at least one block of 32 columns."""
    return cfg._replace(block_k=max(32, cfg.block_k))


def qgemv_a8(x: Tensor, w, b: Tensor | None = None, *, norm: Tensor | None = None, eps: float = 1e-6,
             silu: bool = False, residual: Tensor | None = None, backend: str = "torch",
             config: Config | None = None) -> Tensor:
    """``qgemv_a8_ref`` (``backend="torch"``) or the kernels (``"triton"``, x of at most ``MAX_ROWS`` rows; more
    run the reference) at ``config`` (default ``a8_config``; ``config.fuse``: one kernel, the quantization inside the
    product's; a ``Split`` is refused: the quantization computes the prologue). ``w``: a ``QTensor`` or a
    ``QuantLinear``; K a multiple of 32."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"qgemv_a8 backend {backend!r} is not one of ('torch', 'triton')")
    if config is not None and not isinstance(config, Config):
        raise ValueError(f"qgemv_a8 takes a Config, not {config!r} (the prologue is inside the quantization kernel)")
    qt = _qt(w)
    if qt.shape[1] % ACT_BLOCK:
        raise ValueError(f"act_quant='int8': the weight's K = {qt.shape[1]} is not a multiple of {ACT_BLOCK}")
    fusion = dict(norm=norm, eps=eps, silu=silu, residual=residual)
    if backend == "torch":
        return qgemv_a8_ref(x, qt, b, **fusion)
    if triton is None:
        raise RuntimeError("qgemv_a8 backend='triton' needs the triton package")
    _check(x, qt, b, norm, silu, residual)
    width = x.shape[-1]
    m = x.numel() // width if width else 0
    if m == 0 or m > MAX_ROWS:
        return qgemv_a8_ref(x, qt, b, **fusion)
    config = a8_kernel_config(config if config is not None else a8_config(m, qt.bits))
    x2 = x.reshape(m, width)
    if x2.stride(-1) != 1 or x2.stride(0) != width:
        x2 = x2.contiguous()
    r2 = None
    if residual is not None:
        r2 = residual.reshape(m, qt.shape[0])
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    y = torch.ops.zmzoo.qgemv_a8(x2, qt.q, qt.scale, qt.zero, b, norm, r2, float(eps), bool(silu), int(qt.group),
                                 int(qt.bits), *config)
    return y.reshape(*x.shape[:-1], qt.shape[0])


__all__ = ["ACT_BLOCK", "ActQ", "qgemv_a8", "qgemv_a8_ref", "quantize_act", "quantize_act_ref", "a8_error_bound"]

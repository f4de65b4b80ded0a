"""Matrix-vector products of a decode step with a quantized weight: y = pro(x) @ dequantize(w).T (+ b) (+ residual).

``zmzoo.ops.gemv`` for weights in zmzoo's quantized layout (``zmzoo.ops.quant``): the same prologues (RMSNorm of the
input, SiLU gate of gate|up) and epilogues (bias, residual add), the same ``Config`` launch settings, tuned by the
same ``gemv.tune``. The kernel streams the integers and scales once, row-tile by row-tile, and dequantizes in
registers (fp32), so a step reads 1 byte (int8) or half a byte (int4) a weight plus the scales, instead of 2 (bf16):

- int8, one scale a row (zmzoo's ``quantize="int8"``): the integer products are summed in fp32 and scaled once a
  row at the end, as the RMSNorm's rsqrt is;
- int8 per group (GGUF Q8_0): every element is dequantized with its group's scale before its product;
- int4 (zmzoo's ``quantize="int4"``, GGUF Q4_0 / Q4_1): the scale and zero are factored out of each group's dot
  product (``_qgemv_kernel``), so an element costs its unpacking and one FMA. The tile is read as int32 words, 8
  nibbles each (4 bytes of one 32-column chunk: the low nibbles are 4 consecutive columns, the high ones 16
  further), each nibble multiplied by the input at its column.

``qgemv_ref`` is the plain-torch composition: ``dequantize_ref`` to the activations' dtype, then ``gemv_ref``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from zmzoo.ops._launch import launch, next_pow2
from zmzoo.ops.gemv import (
    _DTYPES,
    MAX_ROWS,
    Config,
    Split,
    _epilogue,
    _input_at,
    _input_tile,
    for_rows,
    gemv_ref,
    prologue,
)
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


def _nibble(v, MASK: tl.constexpr, MAGIC, BIAS: tl.constexpr):
    """The field of the int32 words ``v`` under ``MASK`` (bits s..s+3 of a nibble or s..s+7 of a byte, s = 0, 4, 8 or
    12) as a centred integer in fp32 (q - 8 for a nibble, the signed byte for a byte). Without an integer-to-float
    conversion (a fraction of the FMA rate on the GPU): the field XOR-ed into ``MAGIC``, the bits of 2^(23 - s)
    (whose last mantissa bit weighs 2^-s), is the float 2^(23 - s) + u exactly, and one exact subtraction of ``BIAS``
    = 2^(23 - s) + c leaves u - c. A nibble: MAGIC has no bit under the mask (the XOR is an OR), u = q, c = 8. A
    signed byte: MAGIC also has the byte's top bit, so u = q + 128 (two's complement with its sign bit flipped), and
    c = 128."""
    return ((v & MASK) ^ MAGIC).to(tl.float32, bitcast=True) - BIAS


def _nibble_dot(dot, xs, sqs, v, MASK: tl.constexpr, MAGIC, BIAS: tl.constexpr, x_ptrs, g_ptrs, mask_x, mask_g, K,
                SILU: tl.constexpr, NORM: tl.constexpr):
    """One field of every word (``_nibble``) times the input at its columns (``_input_at``), added to ``dot``; the
    input added to ``xs``, its square to ``sqs``."""
    x, x2 = _input_at(x_ptrs, g_ptrs, mask_x, mask_g, K, SILU, NORM)
    return dot + _nibble(v, MASK, MAGIC, BIAS) * x, xs + x, sqs + x2


def _qgemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, g_ptr, r_ptr, y_ptr, p_ptr, sq_ptr,
    M, N, K, KT, stride_xm, stride_qn, stride_sn, stride_rm, stride_ym, eps, magic,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SUB: tl.constexpr, EVEN_K: tl.constexpr,
    WORDS: tl.constexpr, SPLIT: tl.constexpr,
):
    """Program (p, s) computes y[:, p*BLOCK_N : (p+1)*BLOCK_N] for all M rows over the columns [s R, (s+1) R) of K,
    R = KT * BLOCK_K, reading its BLOCK_N rows of integers once, BLOCK_K columns at a time. SPLIT 1: R >= K, and the
    program finishes its outputs itself (``_epilogue``); SPLIT > 1: it stores its sums to the fp32 partials ``p_ptr``
    (SPLIT, M, N) and the squares of x to ``sq_ptr`` (SPLIT, M), which ``_qgemv_reduce`` adds up. GROUP 0: one scale
    a row (8 bits only), applied after the sum over K; else the scale (and zero) of column c is at c // GROUP.

    WORDS (4 bits always; 8 bits when K is a multiple of 4): the integers are read as int32 words (``q_ptr`` an int32
    view, ``stride_qn`` in words), and the scale and zero are factored out of each group's dot product: with
    w = s (q - 8) + z' (z' = zero + 8 s; the zero-less Q4_0 form is z' = 0; for 8 bits w = s q), y = sum over groups
    of s * sum(q_i - 8) x_i + z' * sum x_i. Per element the loop only unpacks (one LOP3 and one exact FADD:
    ``_nibble``) and does one FMA; the scales are loaded once a (row, sub-block) of SUB columns (SUB divides GROUP and
    BLOCK_K: a group, or a part of one), the input sums once a sub-block for all rows. With one scale a row SUB
    divides K and BLOCK_K, the products are summed in place and the scale comes at the end. The RMSNorm's rsqrt, a
    scalar a row, also comes at the end (both terms are linear in x). EVEN_K: K is a multiple of BLOCK_K, so the
    columns need no mask. ``magic``: 0x4B000000 (see below).

    Not WORDS (8 bits, K not a multiple of 4): each int8 element converted to fp32 (and dequantized with its group's
    scale) before its product, ``_gemv_kernel``'s scheme."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_lo = pid_k * KT * BLOCK_K  # (a multiple of BLOCK_K the compiler can see: the loads stay 16-byte vectors)
    k_hi = tl.minimum(K, k_lo + KT * BLOCK_K)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    rows = offs_n[:, None]
    if not WORDS:
        acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
        sq = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # NORM: x^2 summed over the K steps
        for k0 in range(k_lo, k_hi, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_hi
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
        # int32 words, (NSUB, BLOCK_N, WS) a tile: sub-block j holds columns [j SUB, (j+1) SUB) of the tile, all of
        # one group (or all in range or all out, with one scale a row), WS = SUB / COLS words. 4 bits: word t of a
        # row's tile holds its bytes 4t..4t+3, in 32-column chunk t // 4: byte 4 (t % 4) + b has column
        # 32 (t // 4) + 4 (t % 4) + b in its low nibble (bits 8b..8b+3 of the word) and that column + 16 in its high
        # nibble (bits 8b+4..8b+7). 8 bits: word t holds columns 4t..4t+3, column 4t + b in bits 8b..8b+7
        COLS: tl.constexpr = 32 // BITS  # columns a word
        WS: tl.constexpr = SUB // COLS
        NSUB: tl.constexpr = BLOCK_K // SUB
        # 4-D tiles (BLOCK_M, NSUB, BLOCK_N, WS), built at full rank from the start (no expand_dims of a loaded
        # tile, which would move it through shared memory). Triton's coalescing orders a load's dimensions by
        # contiguity, ties in index order, and gives lanes and warps to them in that order: 4 words (16 bytes) a
        # thread along WS, then NSUB, then BLOCK_N last, so a thread holds several rows of the same words and loads
        # and converts their inputs once for all of them
        m4 = offs_m[:, None, None, None]
        mask_m4 = mask_m[:, None, None, None]
        rows4 = offs_n[None, None, :, None]
        mask_n4 = mask_n[None, None, :, None]
        word = tl.arange(0, NSUB)[:, None] * WS + tl.arange(0, WS)[None, :]  # (NSUB, WS) words of the tile
        if BITS == 4:
            col = ((word // 4) * 32 + (word % 4) * 4)[None, :, None, :]  # the column of each word's byte 0, low nibble
        else:
            col = (word * 4)[None, :, None, :]
        word = word[None, :, None, :]
        sub = (tl.arange(0, NSUB) * SUB)[None, :, None, None]  # the sub-blocks' first columns
        s_rows = offs_n[None, None, :]  # (1, 1, BLOCK_N): the scales' tiles are 3-D (BLOCK_M, NSUB, BLOCK_N)
        mask_s_rows = mask_n[None, None, :]
        s_sub = (tl.arange(0, NSUB) * SUB)[None, :, None]
        acc = tl.zeros((BLOCK_M, NSUB, BLOCK_N), dtype=tl.float32)
        acc4 = tl.zeros((BLOCK_M, NSUB, BLOCK_N, WS), dtype=tl.float32)  # GROUP 0: the products, summed at the end
        # _nibble's MAGIC = 2^(23 - s) as bits: a runtime value (magic = 0x4B000000, 2^23), so that it sits in a
        # register and the mask-and-XOR is one LOP3 (with two immediates it takes two); for bytes with their sign
        # bit (0x80 << s) too
        if BITS == 4:
            mg0 = magic
            mg4 = magic - (4 << 23)
            mg8 = magic - (8 << 23)
            mg12 = magic - (12 << 23)
        else:
            mg0 = magic + 0x80
            mg8 = magic - (8 << 23) + 0x8000
        sq = tl.zeros((BLOCK_M, NSUB, 1, WS), dtype=tl.float32)
        q_ptrs = q_ptr + rows4 * stride_qn + word
        if EVEN_K:
            v_next = tl.load(q_ptrs + k_lo // COLS, mask=mask_n4, other=0)
        else:
            v_next = tl.load(q_ptrs + k_lo // COLS, mask=mask_n4 & ((k_lo + sub) < k_hi), other=0)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            cols = k0 + col  # (1, NSUB, 1, WS)
            # a sub-block is all in or all out (SUB divides K and BLOCK_K: a mask constant along the words, so
            # that a thread's words load as one vector)
            mask_k = (k0 + sub) < k_hi
            # the next tile's words are loaded before this one's arithmetic (a register double buffer: Triton
            # pipelines only loads that feed a dot); past the last tile the mask reads nothing
            v = v_next
            v_next = tl.load(q_ptrs + (k0 + BLOCK_K) // COLS, mask=mask_n4 & ((k0 + BLOCK_K + sub) < k_hi), other=0)
            v_hi = v >> 16  # bytes 2 and 3 moved to bits 0..15 (the exponent trick needs the field below bit 20)
            x_ptrs = x_ptr + m4 * stride_xm + cols
            g_ptrs = g_ptr + cols
            if EVEN_K:  # every column is in range: x masked by its rows only (not at all at batch 1: M is 1)
                mask_k = None
                mask_x = mask_m4
            else:
                mask_x = mask_m4 & mask_k
            t = (-0.0, -0.0, -0.0)  # x + -0.0 is x: the compiler drops the first additions
            if BITS == 4:
                # the 8 nibbles of each word times the input at their columns (BLOCK_M, NSUB, BLOCK_N, WS): byte b's
                # low nibble (bits 8b.., of v for b < 2, of v_hi at 8 (b - 2)..) at the word's column + b, its high
                # one at column + 16 + b; xs: the inputs' sum (the zero's term), sqs their squares (the norm's)
                t = _nibble_dot(*t, v, 0xF, mg0, 8388616.0, x_ptrs, g_ptrs, mask_x, mask_k, K, SILU, NORM)
                t = _nibble_dot(*t, v, 0xF0, mg4, 524296.0, x_ptrs + 16, g_ptrs + 16, mask_x, mask_k, K, SILU, NORM)
                t = _nibble_dot(*t, v, 0xF00, mg8, 32776.0, x_ptrs + 1, g_ptrs + 1, mask_x, mask_k, K, SILU, NORM)
                t = _nibble_dot(*t, v, 0xF000, mg12, 2056.0, x_ptrs + 17, g_ptrs + 17, mask_x, mask_k, K, SILU, NORM)
                t = _nibble_dot(*t, v_hi, 0xF, mg0, 8388616.0, x_ptrs + 2, g_ptrs + 2, mask_x, mask_k, K, SILU, NORM)
                t = _nibble_dot(*t, v_hi, 0xF0, mg4, 524296.0, x_ptrs + 18, g_ptrs + 18, mask_x, mask_k, K, SILU,
                                NORM)
                t = _nibble_dot(*t, v_hi, 0xF00, mg8, 32776.0, x_ptrs + 3, g_ptrs + 3, mask_x, mask_k, K, SILU, NORM)
                dot, xs, sqs = _nibble_dot(*t, v_hi, 0xF000, mg12, 2056.0, x_ptrs + 19, g_ptrs + 19, mask_x, mask_k,
                                           K, SILU, NORM)
            else:  # the 4 signed bytes of each word, at the word's column + b: 2^23 + 128 and 2^15 + 128 the biases
                t = _nibble_dot(*t, v, 0xFF, mg0, 8388736.0, x_ptrs, g_ptrs, mask_x, mask_k, K, SILU, NORM)
                t = _nibble_dot(*t, v, 0xFF00, mg8, 32896.0, x_ptrs + 1, g_ptrs + 1, mask_x, mask_k, K, SILU, NORM)
                t = _nibble_dot(*t, v_hi, 0xFF, mg0, 8388736.0, x_ptrs + 2, g_ptrs + 2, mask_x, mask_k, K, SILU, NORM)
                dot, xs, sqs = _nibble_dot(*t, v_hi, 0xFF00, mg8, 32896.0, x_ptrs + 3, g_ptrs + 3, mask_x, mask_k, K,
                                           SILU, NORM)
            if GROUP == 0:  # one scale a row, applied at the end: the products summed in place, no reduction here
                acc4 += dot
            else:
                # each sub-block's sum of products times its group's scale, loaded once a (row, sub-block): the sums
                # are (BLOCK_M, NSUB, BLOCK_N), WS times smaller than the products, so whatever layout change Triton
                # puts between them and the scales' tile moves little
                mask_s = mask_s_rows & ((k0 + s_sub) < k_hi)
                s_offs = s_rows * stride_sn + (k0 + s_sub) // GROUP
                s = tl.load(s_ptr + s_offs, mask=mask_s, other=0.0).to(tl.float32)
                acc += tl.sum(dot, axis=3) * s
                if HAS_ZERO:  # w = scale * q + zero = scale * (q - 8) + (zero + 8 scale): the centred q keeps the
                    # two terms small (zero + 8 scale is the group's middle), so their sum loses less to cancellation
                    z = tl.load(z_ptr + s_offs, mask=mask_s, other=0.0).to(tl.float32) + 8.0 * s
                    acc += tl.sum(xs, axis=3) * z
            if NORM:
                sq += sqs
        if GROUP == 0:
            acc = tl.sum(acc4, axis=3)
        y = tl.sum(acc, axis=1)
        sq_sum = tl.sum(tl.sum(tl.sum(sq, axis=3), axis=2), axis=1)
    if SPLIT > 1:  # the partial sums, finished by _qgemv_reduce
        mask_y = mask_m[:, None] & mask_n[None, :]
        tl.store(p_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], y, mask=mask_y)
        if NORM:  # the same squares in every row block: the first one's stored
            if pid == 0:
                tl.store(sq_ptr + pid_k * M + offs_m, sq_sum, mask=mask_m)
    else:
        _epilogue(y, sq_sum, offs_m, offs_n, mask_m, mask_n, s_ptr, stride_sn, b_ptr, r_ptr, stride_rm, y_ptr,
                  stride_ym, K, eps, GROUP == 0, NORM, HAS_BIAS, RESIDUAL)


def _qgemv_reduce(p_ptr, sq_ptr, s_ptr, b_ptr, r_ptr, y_ptr, M, N, K, S, stride_sn, stride_rm, stride_ym, eps,
                  ROW_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, NORM: tl.constexpr, RESIDUAL: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The S partial sums of a split product (``_qgemv_kernel`` with SPLIT > 1) added up in a fixed order and
    finished as one program of SPLIT 1 would (``_epilogue``): y[:, p*BLOCK_N : (p+1)*BLOCK_N]."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    mask_y = mask_m[:, None] & mask_n[None, :]
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    sq_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s in range(0, S):
        y += tl.load(p_ptr + (s * M + offs_m[:, None]) * N + offs_n[None, :], mask=mask_y, other=0.0)
        if NORM:
            sq_sum += tl.load(sq_ptr + s * M + offs_m, mask=mask_m, other=0.0)
    _epilogue(y, sq_sum, offs_m, offs_n, mask_m, mask_n, s_ptr, stride_sn, b_ptr, r_ptr, stride_rm, y_ptr, stride_ym,
              K, eps, ROW_SCALE, NORM, HAS_BIAS, RESIDUAL)


def _qgemv_impl(x: Tensor, q: Tensor, scale: Tensor, zero: Optional[Tensor], b: Optional[Tensor],  # noqa: UP045
                norm: Optional[Tensor], residual: Optional[Tensor], eps: float, silu: bool,  # noqa: UP045
                group: int, bits: int, block_n: int, block_k: int, num_warps: int, num_stages: int,
                split: int = 1) -> Tensor:
    m = x.shape[0]
    n = q.shape[0]
    k = q.shape[1] * (8 // bits)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    row_scale = scale.shape[1] == 1 and bits == 8
    words = bits == 4 or k % 4 == 0
    sub = 0
    if words:  # the kernel reads the integers as int32 words (4 bytes: 8 nibbles of one 32-column chunk, or 4 bytes)
        # columns of a sub-block: one group, or a power-of-two part of one; with one scale a row, a part of K
        sub = math.gcd(k if row_scale else group, block_k)
        if q.stride(0) * q.element_size() % 4 or q.storage_offset() * q.element_size() % 4:
            q = q.clone(memory_format=torch.contiguous_format)  # rows not 4-byte aligned (a view): a copy that is
        q = q.view(torch.int32)
    # split: K cut into ranges of whole tiles, one program per (row block, range); as many ranges as that leaves
    kt = max(1, triton.cdiv(triton.cdiv(k, max(1, split)), block_k))  # tiles a range
    splits = max(1, triton.cdiv(k, kt * block_k))
    partial = sq = y
    if splits > 1:
        partial = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        sq = torch.empty((splits, m), dtype=torch.float32, device=x.device)
    launch(_qgemv_kernel, (triton.cdiv(n, block_n), splits),
           x, q, scale, zero if zero is not None else scale, b if b is not None else scale,
           norm if norm is not None else scale, residual if residual is not None else y, y, partial, sq,
           m, n, k, kt, x.stride(0), q.stride(0), scale.stride(0), residual.stride(0) if residual is not None else 0,
           y.stride(0), eps, 0x4B000000, BITS=bits, GROUP=0 if row_scale else group,
           HAS_ZERO=zero is not None, HAS_BIAS=b is not None, NORM=norm is not None, SILU=silu,
           RESIDUAL=residual is not None, BLOCK_M=next_pow2(m), BLOCK_N=block_n, BLOCK_K=block_k, SUB=sub,
           EVEN_K=words and k % block_k == 0, WORDS=words, SPLIT=splits,
           num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        launch(_qgemv_reduce, (triton.cdiv(n, REDUCE_BLOCK),), partial, sq, scale, b if b is not None else scale,
               residual if residual is not None else y, y, m, n, k, splits, scale.stride(0),
               residual.stride(0) if residual is not None else 0, y.stride(0), eps, ROW_SCALE=row_scale,
               HAS_BIAS=b is not None, NORM=norm is not None, RESIDUAL=residual is not None, BLOCK_M=next_pow2(m),
               BLOCK_N=REDUCE_BLOCK, num_warps=4)
    return y


REDUCE_BLOCK = 256  # outputs a program of _qgemv_reduce finishes (N = 4096: 16 programs)


if triton is not None:
    _nibble = triton.jit(_nibble)  # called from the kernel (jitted on first launch, see _launch)
    _nibble_dot = triton.jit(_nibble_dot)
    # zmzoo::qgemv(Tensor x, Tensor q, Tensor scale, Tensor? zero, Tensor? b, Tensor? norm, Tensor? residual,
    #              float eps, bool silu, int group, int bits, int block_n, int block_k, int num_warps,
    #              int num_stages, int split=1) -> Tensor
    _qgemv_op = torch.library.triton_op("zmzoo::qgemv", _qgemv_impl, mutates_args=())


# Launch settings tune() tries for 4-bit weights at 1 row (at 2 and 4 rows ``for_rows`` shrinks BLOCK_K). A thread
# holds R = BLOCK_N * BLOCK_K / (1024 * num_warps) rows of the same 4 words (32 columns), so the 32 inputs it loads
# and converts a step serve R rows (R = 2 to 8 here; 4.7-5.3 instructions a nibble in the loop at R = 4 and 8 in the
# SASS of Triton 3.6 for sm_90, against 3 for the unpacking and product alone; R = 8 needs 128 registers a thread);
# BLOCK_K / 8 * rows < 32 * num_warps keeps the input loads in the weights' layout (Triton moves a load that small
# to its user's layout instead of moving the products through shared memory). num_stages does not change the code
# (the kernel double-buffers its words in registers itself). On the H200 (docs/results/qgemv-speed-h200-split.json,
# LLaMA-2-7B's products) the widest tiles won every product, and splitting K in 4 (a second, small kernel adds the
# ranges up) won all but the LM head, the products of N = 4096 most (o: 13.8 us unsplit, 9.7 split); the settings of
# 128 rows and of 8 ranges were added after that run.
INT4_CANDIDATES = (
    Config(16, 512, 4, 1), Config(32, 512, 4, 1), Config(64, 512, 4, 1), Config(64, 1024, 8, 1),
    Config(32, 512, 4, 1, 2), Config(32, 512, 4, 1, 4), Config(64, 512, 4, 1, 4), Config(64, 512, 4, 1, 8),
    Config(128, 512, 8, 1, 4), Config(128, 256, 4, 1, 4), Config(128, 256, 4, 1, 8),
)
# The same for 8-bit weights read as words (K a multiple of 4; otherwise the element loop runs, at the same
# settings): a thread holds R = BLOCK_N * BLOCK_K / (512 * num_warps) rows of 4 words (16 columns). From the SASS
# (Triton 3.6, sm_90): 5.0-5.7 instructions an element at R = 4 and 8 (the unpacking's LOP3 and FADD and the FMA
# are 3), none through shared memory while BLOCK_K / 4 < 32 * num_warps (at BLOCK_K / 4 = 32 * num_warps the
# inputs' tile goes through shared memory with two barriers a step); R = 16 spills. On the H200 (same file) splits
# of 2 and 4 won the products of 4096 and 12288 rows, 64 rows unsplit gate|up, 32 unsplit the LM head.
INT8_CANDIDATES = (
    Config(16, 256, 4, 1), Config(32, 256, 4, 1), Config(64, 256, 4, 1), Config(32, 512, 8, 1),
    Config(16, 256, 4, 1, 4), Config(32, 256, 4, 1, 2), Config(32, 256, 4, 1, 4), Config(32, 256, 4, 1, 8),
    Config(64, 256, 4, 1, 2), Config(64, 256, 4, 1, 4), Config(128, 256, 8, 1, 2),
)


def candidates(bits: int) -> tuple[Config, ...]:
    """The launch settings ``gemv.tune`` tries for a weight of ``bits`` bits (at 1 row)."""
    return INT4_CANDIDATES if bits == 4 else INT8_CANDIDATES


def qgemv_config(m: int, bits: int) -> Config:
    """The untuned setting at ``m`` rows: 32 rows a program, 4 warps (a thread's 4 words serve 4 rows at 1 row)."""
    return for_rows(Config(32, 512, 4, 1) if bits == 4 else Config(32, 256, 4, 1), m)


def kernel_config(cfg: Config, bits: int) -> Config:
    """A launch setting as the kernel runs it: 4 bits need BLOCK_K a multiple of 32 (a nibble chunk: 4 int32
    words a row)."""
    return cfg._replace(block_k=max(32, cfg.block_k)) if bits == 4 else cfg


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
    ``qgemv_ref``) at ``config`` (default ``qgemv_config``; a ``Split`` computes the SiLU gate or the norm apart by
    torch). ``w``: a ``QTensor`` or a module carrying one (``QuantLinear``). The kernel dequantizes in fp32 and rounds
    once at the end; the reference rounds the dequantized weight to x's dtype first, so in low precision the two agree
    to that rounding, and in fp32 to the summation order."""
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
        config = qgemv_config(m, qt.bits)
    if isinstance(config, Split):
        x, config = prologue(x, norm, eps, silu), config.config
        width, silu, norm = x.shape[-1], False, None
    config = kernel_config(config, qt.bits)
    if config.fuse:
        raise ValueError(f"qgemv: {config} asks fuse={config.fuse}, which only qgemv_a8 has (the activations quantized "
                         "inside its product kernel); this kernel keeps them in the compute dtype")
    x2 = x.reshape(m, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = None
    if residual is not None:
        r2 = residual.reshape(m, qt.shape[0])
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    y = torch.ops.zmzoo.qgemv(x2, qt.q, qt.scale, qt.zero, b, norm, r2, float(eps), bool(silu), int(qt.group),
                              int(qt.bits), *config[:5])
    return y.reshape(*x.shape[:-1], qt.shape[0])

"""Weight-only quantized matrices: zmzoo's layout, quantizing to it, GGUF blocks repacked into it, dequantizing.

A quantized (N, K) weight (N output features, K input features) is a ``QTensor``:

- ``q``: the integers, row-major. 8 bits: int8 (N, K). 4 bits: uint8 (N, K / 2), two values a byte in llama.cpp's
  order, in chunks of 32 columns: byte ``16 c + j`` of a row holds column ``32 c + j`` in its low nibble and column
  ``32 c + 16 + j`` in its high nibble (the ``qs`` of a GGUF Q4_0 / Q4_1 block, so those blocks are copied, not
  shuffled);
- ``scale``: (N, K / group), one step per group of ``group`` consecutive columns of a row; fp16 or fp32, never bf16
  (bf16 holds 8 bits of mantissa, so it cannot hold every fp16 scale of a GGUF file);
- ``zero``: None, or (N, K / group) in the scale's dtype: the group's minimum.

The value of an element q of group g is

    8 bits:             w = scale[g] * q                   (q in -127..127; GGUF Q8_0 with group 32)
    4 bits, zero None:  w = scale[g] * (q - 8)             (q in 0..15; GGUF Q4_0, group 32)
    4 bits, zero:       w = scale[g] * q + zero[g]         (q in 0..15; GGUF Q4_1, group 32)

computed in fp32 (the products are exact: an fp16 scale has 11 significant bits, q at most 4 or 8), which is what
gguf's own ``dequantize`` computes, so a GGUF tensor repacked here dequantizes to gguf's values bit for bit.

zmzoo's own quantization (``quantize_int8``, ``quantize_int4``): int8 symmetric per output channel (group = K, one
fp32 scale a row: amax / 127); int4 asymmetric per group of 32, 64 or 128 (fp16 scale and minimum, the Q4_1 form).
``dequantize`` turns a QTensor back into a dense matrix: the torch reference anywhere, a Triton kernel on CUDA (the
prompt's products dequantize one matrix at a time just before their GEMM).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from zmzoo.ops._launch import launch

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; only backend='triton' needs it
    triton = tl = None

INT4_GROUPS = (32, 64, 128)
CHUNK = 32  # columns per nibble chunk of the 4-bit layout (a GGUF block)
FP16_MAX = 65504.0


class QTensor(NamedTuple):
    """A quantized (N, K) weight (see the module docstring). ``group`` is K for one scale a row."""
    q: Tensor
    scale: Tensor
    zero: Optional[Tensor]  # noqa: UP045
    group: int
    bits: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.q.shape[0], self.q.shape[1] * (8 // self.bits)))

    @property
    def device(self) -> torch.device:
        return self.q.device

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for t in (self.q, self.scale, self.zero) if t is not None)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def map(self, fn) -> QTensor:
        """The same weight with ``fn`` applied to each of its tensors (a row permutation, ``.to(device)``)."""
        return self._replace(q=fn(self.q), scale=fn(self.scale), zero=None if self.zero is None else fn(self.zero))


class QFormat(NamedTuple):
    """What a quantized product's kernel is specialised for (a tuning key's dtype part)."""
    bits: int
    group: int  # 0: one scale a row
    zero: bool
    scale_dtype: torch.dtype
    act_dtype: torch.dtype
    act_quant: Optional[str] = None  # noqa: UP045  # "int8": the activations quantized too (zmzoo.ops.qgemv_a8)

    def __str__(self) -> str:
        g = "row" if self.group == 0 else f"g{self.group}"
        a8 = f" x {self.act_quant}" if self.act_quant else ""
        return (f"int{self.bits}{g}{'+zero' if self.zero else ''}/{str(self.scale_dtype).replace('torch.', '')}"
                f"->{str(self.act_dtype).replace('torch.', '')}{a8}")


def qformat(w, act_dtype: torch.dtype, act_quant: str | None = None) -> QFormat:
    """The ``QFormat`` of a QTensor (or anything with its fields, e.g. a ``QuantLinear``) multiplied by activations of
    ``act_dtype`` (quantized to ``act_quant`` first, if set)."""
    per_row = w.scale.shape[1] == 1
    return QFormat(w.bits, 0 if per_row else w.group, w.zero is not None, w.scale.dtype, act_dtype, act_quant)


def is_quantized(w) -> bool:
    """True for a QTensor or a module carrying one (``zmzoo.models.quant.QuantLinear``)."""
    return hasattr(w, "q") and hasattr(w, "scale") and hasattr(w, "bits")


def check_qtensor(w: QTensor) -> None:
    """Raise ValueError when ``w``'s tensors do not form a quantized weight of the documented layout."""
    n = w.q.shape[0]
    if w.bits == 8:
        ok = w.q.dtype == torch.int8
    elif w.bits == 4:
        ok = w.q.dtype == torch.uint8
    else:
        raise ValueError(f"quantized weight: bits={w.bits}, must be 8 or 4")
    k = w.shape[1]
    groups = k // w.group if w.group and k % w.group == 0 else -1
    if not ok or w.q.dim() != 2 or groups < 1 or tuple(w.scale.shape) != (n, groups) \
            or (w.bits == 4 and (w.group % CHUNK or k % CHUNK)) \
            or w.scale.dtype not in (torch.float16, torch.float32) \
            or (w.zero is not None and (w.zero.shape != w.scale.shape or w.zero.dtype != w.scale.dtype)):
        zero = None if w.zero is None else (w.zero.dtype, tuple(w.zero.shape))
        raise ValueError(f"quantized weight: q {w.q.dtype} {tuple(w.q.shape)}, scale {w.scale.dtype} "
                         f"{tuple(w.scale.shape)}, zero {zero}, group {w.group}, bits {w.bits} do not form zmzoo's "
                         f"layout (zmzoo/ops/quant.py)")


# ------------------------------------------------------------------------------------------------------ quantizing
def _nudge(h: Tensor, x: Tensor, up: bool) -> Tensor:
    """fp16 ``h`` (x rounded to nearest) moved one step so that it is >= x (``up``) or <= x, by its bits (an fp16's
    neighbours are the integers next to its bit pattern, read as sign and magnitude)."""
    bad = h.float() < x if up else h.float() > x
    bits = h.view(torch.int16).to(torch.int32)
    mag, neg = bits & 0x7FFF, bits < 0
    away = neg != up  # moving away from zero: magnitude + 1; toward it: magnitude - 1 (through zero: the sign flips)
    stepped = torch.where(away, mag + 1, mag - 1)
    flip = stepped < 0  # a zero stepped toward the other sign: the smallest subnormal of that sign
    sign = torch.where(flip, ~neg, neg)
    stepped = torch.where(flip, torch.ones_like(stepped), stepped)
    moved = (stepped | torch.where(sign, 0x8000, 0)).to(torch.int16).view(torch.float16)
    return torch.where(bad, moved, h)


def _rows(w: Tensor, rows: int):
    for a in range(0, w.shape[0], rows):
        yield a, w[a : a + rows].float()


@torch.no_grad()
def quantize_int8(w: Tensor, rows: int = 4096) -> QTensor:
    """Symmetric int8 per output channel: scale = max|w_row| / 127 (fp32), q = round(w / scale) in -127..127, so
    |w - scale * q| <= scale / 2. Quantized ``rows`` rows at a time (bounded fp32 temporaries)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_int8 takes a 2-D floating-point weight, got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    q = torch.empty((n, k), dtype=torch.int8, device=w.device)
    scale = torch.empty((n, 1), dtype=torch.float32, device=w.device)
    for a, wf in _rows(w, rows):
        s = wf.abs().amax(1, keepdim=True) / 127
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: any step gives q = 0
        q[a : a + len(wf)] = torch.round(wf / s).clamp_(-127, 127).to(torch.int8)
        scale[a : a + len(wf)] = s
    return QTensor(q, scale, None, k, 8)


def pack_int4(q: Tensor) -> Tensor:
    """(N, K) integers in 0..15 -> (N, K / 2) uint8 in the chunked nibble order (module docstring)."""
    n, k = q.shape
    c = q.to(torch.uint8).reshape(n, k // CHUNK, 2, CHUNK // 2)  # (N, chunks, low | high half, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(p: Tensor) -> Tensor:
    """The inverse of ``pack_int4``: (N, K / 2) uint8 -> (N, K) uint8 in 0..15."""
    n, half = p.shape
    c = p.reshape(n, half // (CHUNK // 2), 1, CHUNK // 2)
    return torch.cat((c & 15, c >> 4), dim=2).reshape(n, 2 * half)


def check_group(group: int, k: int, what: str = "the weight's in_features") -> None:
    """Raise ValueError unless ``group`` is an int4 group size that divides ``k`` (``what`` names k)."""
    if isinstance(group, bool) or not isinstance(group, int) or group not in INT4_GROUPS:
        raise ValueError(f"group_size={group!r} must be one of {INT4_GROUPS} (int4 columns per scale)")
    if k % group:
        fits = [g for g in INT4_GROUPS if k % g == 0]
        raise ValueError(f"group_size={group} does not divide {what} = {k} (the in_features of a quantized layer); "
                         + (f"choose group_size={' or '.join(map(str, fits))}" if fits else
                            f"no int4 group size {INT4_GROUPS} divides it") + ", or quantize='int8'")


@torch.no_grad()
def quantize_int4(w: Tensor, group: int = 64, rows: int = 4096) -> QTensor:
    """Asymmetric int4 per group of ``group`` columns (the Q4_1 form at any group): zero = the group's minimum rounded
    down to fp16, scale = (max - zero) / 15 rounded up to fp16, q = round((w - zero) / scale) in 0..15; so every
    |w - (scale * q + zero)| <= scale / 2 (up to fp32 rounding). Raises ValueError when the group does not divide K
    or a value exceeds fp16's range."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_int4 takes a 2-D floating-point weight, got {w.dtype} {tuple(w.shape)}")
    n, k = w.shape
    check_group(group, k)
    g = k // group
    packed = torch.empty((n, k // 2), dtype=torch.uint8, device=w.device)
    scale = torch.empty((n, g), dtype=torch.float16, device=w.device)
    zero = torch.empty((n, g), dtype=torch.float16, device=w.device)
    for a, wf in _rows(w, rows):
        wg = wf.reshape(len(wf), g, group)  # (rows, groups, group)
        lo, hi = wg.amin(-1), wg.amax(-1)
        if not (bool(torch.isfinite(wf).all()) and lo.abs().max() < FP16_MAX and (hi - lo).max() / 15 < FP16_MAX):
            raise ValueError("quantize_int4: the weight has values outside fp16's range (or not finite), which "
                             "its fp16 scales cannot hold; use quantize='int8'")
        z = _nudge(lo.half(), lo, up=False)
        step = ((hi - z.float()) / 15).clamp_(min=2.0**-24)  # a constant group: the smallest fp16 step, q = 0
        s = _nudge(step.half(), step, up=True)
        q = torch.round((wg - z.float()[..., None]) / s.float()[..., None]).clamp_(0, 15)
        packed[a : a + len(wf)] = pack_int4(q.reshape(len(wf), k))
        scale[a : a + len(wf)], zero[a : a + len(wf)] = s, z
    return QTensor(packed, scale, zero, group, 4)


# ------------------------------------------------------------------------------------------------------ GGUF blocks
# bytes of one block of 32 weights (gguf.GGML_QUANT_SIZES): fp16 d, [fp16 m], qs
GGUF_BLOCKS = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}


def from_gguf_blocks(raw: Tensor, kind: str, k: int) -> QTensor:
    """A GGUF Q8_0 / Q4_0 / Q4_1 tensor's raw bytes (N, K / 32 * block bytes, uint8, any device) as a QTensor:
    the fp16 d (and m) bytes reinterpreted as fp16 scales (and zeros), the qs bytes kept as they are. Integer copies
    only: nothing goes through a float conversion."""
    if kind not in GGUF_BLOCKS:
        raise ValueError(f"GGML type {kind} has no zmzoo layout (native: {', '.join(GGUF_BLOCKS)})")
    n = raw.shape[0]
    size = GGUF_BLOCKS[kind]
    blocks = raw.reshape(n, k // CHUNK, size)  # (N, blocks, bytes)

    def half(a: int) -> Tensor:  # bytes a, a + 1 of every block as one fp16 each: (N, blocks)
        return blocks[:, :, a : a + 2].contiguous().view(torch.float16).reshape(n, k // CHUNK)

    if kind == "Q8_0":
        return QTensor(blocks[:, :, 2:].contiguous().view(torch.int8).reshape(n, k), half(0), None, CHUNK, 8)
    if kind == "Q4_0":
        return QTensor(blocks[:, :, 2:].reshape(n, k // 2).contiguous(), half(0), None, CHUNK, 4)
    return QTensor(blocks[:, :, 4:].reshape(n, k // 2).contiguous(), half(0), half(2), CHUNK, 4)


# ------------------------------------------------------------------------------------------------------ dequantizing
def dequantize_ref(w: QTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense (N, K) matrix in ``dtype``, computed in fp32 (module docstring), then rounded once.
    Reads N K bits / 8 + scales, writes N K elements of ``dtype`` (with fp32 temporaries)."""
    n, k = w.shape
    q = w.q.float() if w.bits == 8 else unpack_int4(w.q).float()  # (N, K)
    if w.bits == 4 and w.zero is None:
        q = q - 8
    g = k // w.group
    out = q.reshape(n, g, w.group) * w.scale.float()[..., None]  # (N, groups, group)
    if w.zero is not None:
        out = out + w.zero.float()[..., None]
    return out.reshape(n, k).to(dtype)


def dequantize_rows_ref(w: QTensor, idx: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows ``idx`` (any shape) of the dense matrix: (*idx.shape, K), as ``dequantize_ref`` computes them (an
    embedding lookup in a quantized table). Reads only those rows."""
    flat = idx.reshape(-1)
    rows = QTensor(w.q[flat], w.scale[flat], None if w.zero is None else w.zero[flat], w.group, w.bits)
    return dequantize_ref(rows, dtype).reshape(*idx.shape, w.shape[1])


def _dequant_kernel(q_ptr, s_ptr, z_ptr, y_ptr, N, K, stride_qn, stride_sn, stride_yn,
                    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (i, j) writes the dense tile y[i*BLOCK_N : .., j*BLOCK_K : ..] of the (N, K) weight."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    rows = offs_n[:, None]
    if BITS == 8:
        q = tl.load(q_ptr + rows * stride_qn + offs_k[None, :], mask=mask, other=0).to(tl.float32)
    else:  # column c sits in byte 16 (c // 32) + c % 16, in the high nibble when c % 32 >= 16
        byte = (offs_k // 32) * 16 + offs_k % 16
        shift = ((offs_k % 32) // 16) * 4
        b = tl.load(q_ptr + rows * stride_qn + byte[None, :], mask=mask, other=0).to(tl.int32)
        q = ((b >> shift[None, :]) & 15).to(tl.float32)
        if not HAS_ZERO:
            q = q - 8.0
    grp = offs_k // GROUP
    w = q * tl.load(s_ptr + rows * stride_sn + grp[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        w = w + tl.load(z_ptr + rows * stride_sn + grp[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows * stride_yn + offs_k[None, :], w.to(y_ptr.dtype.element_ty), mask=mask)


def _dequant_impl(q: Tensor, scale: Tensor, zero: Optional[Tensor], group: int, bits: int,  # noqa: UP045
                  dtype: torch.dtype) -> Tensor:
    n = q.shape[0]
    k = q.shape[1] * (8 // bits)
    y = torch.empty((n, k), dtype=dtype, device=q.device)
    block_n, block_k = 32, 128
    launch(_dequant_kernel, (triton.cdiv(n, block_n), triton.cdiv(k, block_k)), q, scale,
           zero if zero is not None else scale, y, n, k, q.stride(0), scale.stride(0), y.stride(0),
           BITS=bits, GROUP=group, HAS_ZERO=zero is not None, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return y


if triton is not None:
    # zmzoo::dequantize(Tensor q, Tensor scale, Tensor? zero, int group, int bits, ScalarType dtype) -> Tensor
    _dequant_op = torch.library.triton_op("zmzoo::dequantize", _dequant_impl, mutates_args=())


def dequantize(w: QTensor, dtype: torch.dtype = torch.float32, backend: str = "torch") -> Tensor:
    """``dequantize_ref`` (``backend="torch"``) or the Triton kernel (``"triton"``: one pass, no fp32 temporaries;
    the fp32 arithmetic may contract into FMAs on a GPU, so results can differ from the reference in the last bit
    before the final rounding)."""
    if backend == "torch":
        return dequantize_ref(w, dtype)
    if backend != "triton":
        raise ValueError(f"dequantize backend {backend!r} is not one of ('torch', 'triton')")
    if triton is None:
        raise RuntimeError("dequantize backend='triton' needs the triton package")
    q, scale, zero = (t if t is None or t.stride(-1) == 1 else t.contiguous() for t in (w.q, w.scale, w.zero))
    return torch.ops.zmzoo.dequantize(q, scale, zero, int(w.group), int(w.bits), dtype)

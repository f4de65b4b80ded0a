"""Quantized layers of the model: ``QuantLinear`` (an ``nn.Linear`` whose weight is a ``zmzoo.ops.quant.QTensor``) and
``QuantEmbedding``; which weights ``zmzoo.load(quantize=...)`` quantizes and how (``QuantSpec``).

A quantized layer keeps its integers, scales and zeros as module buffers (so ``.to``, ``state_dict``, shared copies
and CUDA graphs see them as the model's own tensors, never as inputs to copy). Its prompt path (many rows)
dequantizes the matrix to the compute dtype just before the GEMM and frees it after (``dequantize``: the Triton kernel
on CUDA); the decode step's products go through ``zmzoo.ops.qgemv``, which dequantizes in registers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zmzoo.ops.gemv import MAX_ROWS
from zmzoo.ops.qgemv import qgemv
from zmzoo.ops.qgemv_a8 import ACT_BLOCK, check_act_quant, qgemv_a8
from zmzoo.ops.quant import INT4_GROUPS, QTensor, check_group, check_qtensor, dequantize, quantize_int4, quantize_int8

MODES = ("auto", None, "int8", "int4", "gguf")
DEFAULT_GROUP = 64

# the block linears: every product of a decoder layer (q, k, v, o, gate, up, down)
BLOCK_LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def is_block_linear(name: str) -> bool:
    """``layers.{i}.<one of BLOCK_LINEARS>.weight``."""
    return name.startswith("layers.") and name.endswith(".weight") and name.split(".", 2)[2][: -len(".weight")] \
        in BLOCK_LINEARS


@dataclass(frozen=True)
class QuantSpec:
    """How ``zmzoo.load`` quantizes weights read at full precision: ``mode`` "int8" (per output channel) or "int4"
    (per ``group`` columns, asymmetric). The block linears get ``mode``; the LM head gets int8 per channel in both
    modes (its error lands on the logits unscaled, and it is 0.5-20 % of a model's bytes); the embedding is quantized
    only when it is the LM head (tied), as int8 rows; an untied embedding stays in the compute dtype (a decode step
    reads one row of it)."""
    mode: str
    group: int = DEFAULT_GROUP

    def for_name(self, name: str, tied: bool) -> str | None:
        """"int8", "int4" or None (kept dense) for the zmzoo tensor ``name``."""
        if is_block_linear(name):
            return self.mode
        if name == "output.weight" or (tied and name == "tok_embeddings.weight"):
            return "int8"
        return None

    def quantize(self, w: Tensor, kind: str) -> QTensor:
        return quantize_int8(w) if kind == "int8" else quantize_int4(w, self.group)


def quantize_transform(spec: QuantSpec | None, tied: bool) -> Callable | None:
    """The per-tensor function (zmzoo name, tensor) -> tensor or QTensor that quantizes what ``spec`` says as the
    weights are read (None when ``spec`` is None)."""
    if spec is None:
        return None

    def transform(name: str, t: torch.Tensor):
        kind = spec.for_name(name, tied)
        if kind is None or t.dim() != 2 or not t.is_floating_point():
            return t
        try:
            return spec.quantize(t, kind)
        except ValueError as e:
            raise ValueError(f"quantize={spec.mode!r}: tensor {name!r} {tuple(t.shape)}: {e}") from None

    return transform


def resolve_quantize(quantize, group_size, *, gguf: bool, device: torch.device | str = "cuda"
                     ) -> tuple[str | None, int | None]:
    """``zmzoo.load``'s ``quantize`` / ``group_size`` checked and resolved: ("gguf" | "int8" | "int4" | None, group).
    "auto" is "gguf" for a GGUF file on CUDA (its Q8_0 / Q4_0 / Q4_1 tensors kept as they are; ``load_gguf``'s
    "auto" falls back to dequantizing a file that holds other quantized types) and None otherwise: on a CPU there is
    no kernel, and the torch reference dequantizes every matrix at every step (about 4x slower decode than weights
    dequantized once at load, docs/quantization.md)."""
    if quantize not in MODES:
        raise ValueError(f"quantize={quantize!r} is not one of {MODES} (None: full precision; 'auto': a GGUF file "
                         f"keeps its quantization on CUDA, everything else loads at full precision)")
    if quantize == "auto":
        quantize = "gguf" if gguf and torch.device(device).type == "cuda" else None
    if quantize == "gguf" and not gguf:
        raise ValueError("quantize='gguf' keeps a GGUF file's quantized tensors; this checkpoint is not a GGUF file "
                         "(use quantize='int8' or 'int4')")
    if group_size is not None and quantize != "int4":
        raise ValueError(f"group_size={group_size!r} applies to quantize='int4' only (int8 is per output channel; "
                         f"GGUF tensors keep their blocks of 32); got quantize={quantize!r}")
    if quantize == "int4":
        group_size = DEFAULT_GROUP if group_size is None else group_size
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in INT4_GROUPS:
            raise ValueError(f"group_size={group_size!r} must be one of {INT4_GROUPS} (int4 columns per scale)")
    return quantize, group_size


def check_divisible(args, group: int) -> None:
    """Every block linear's in_features (dim, n_heads * head_dim, intermediate_size) divisible by the int4 group."""
    for what, k in (("dim", args.dim), ("n_heads * head_dim", args.n_heads * args.head_dim),
                    ("intermediate_size", args.intermediate_size)):
        check_group(group, k, f"{args.name}'s {what}")


class QuantLinear(nn.Module):
    """``y = x @ dequantize(w).T (+ bias)`` with w a ``QTensor`` kept as buffers ``q``, ``scale``, ``zero``.

    ``dtype``: the compute dtype (what the prompt path dequantizes to). ``backend``: "triton" dequantizes the prompt's
    matrices with the kernel, "torch" with the reference (``Transformer.set_quant_backend``). ``act_quant``: None, or
    "int8": products of at most ``MAX_ROWS`` rows (the decode step's) quantize the activations to int8 per 32 columns
    first (``zmzoo.ops.qgemv_a8``; ``set_act_quant``); the prompt's products stay weight-only."""

    def __init__(self, w: QTensor, bias: Tensor | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        check_qtensor(w)
        self.register_buffer("q", w.q)
        self.register_buffer("scale", w.scale)
        self.register_buffer("zero", w.zero)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group, self.bits, self.dtype = w.group, w.bits, dtype
        self.out_features, self.in_features = w.shape
        self.backend = "torch"
        self.act_quant: str | None = None

    def set_act_quant(self, act_quant: str | None) -> None:
        """None, or "int8" (in_features must be a multiple of 32, one activation scale per 32 columns)."""
        check_act_quant(act_quant)
        if act_quant is not None and self.in_features % ACT_BLOCK:
            raise ValueError(f"act_quant={act_quant!r} needs in_features a multiple of {ACT_BLOCK}; this "
                             f"{self.out_features} x {self.in_features} layer's is not")
        self.act_quant = act_quant

    @property
    def qtensor(self) -> QTensor:
        return QTensor(self.q, self.scale, self.zero, self.group, self.bits)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        """The dense weight in ``dtype`` (default: the compute dtype)."""
        return dequantize(self.qtensor, dtype or self.dtype, backend=self.backend)

    def forward(self, x: Tensor) -> Tensor:
        """The prompt path: the weight dequantized to x's dtype for this one product (freed after), then F.linear; a
        few rows (a one-token prompt's last position) by the decode kernel when the backend is "triton"."""
        few = x.shape[-1] and x.numel() // x.shape[-1] <= MAX_ROWS
        if few and self.act_quant:
            return qgemv_a8(x, self, self.bias, backend=self.backend)
        if few and self.backend == "triton":
            return qgemv(x, self, self.bias, backend="triton")
        return F.linear(x, self.dense(x.dtype), self.bias)

    def extra_repr(self) -> str:
        zero = " with zero" if self.zero is not None else ""
        group = "per output channel" if self.scale.shape[1] == 1 else f"group {self.group}"
        a8 = f", activations {self.act_quant} (decode)" if self.act_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits} {group}{zero}, "
                f"scale {str(self.scale.dtype).replace('torch.', '')}{a8}")


class QuantEmbedding(nn.Module):
    """An embedding table stored as a ``QTensor`` (rows = tokens): a lookup dequantizes only the rows it reads."""

    def __init__(self, w: QTensor, dtype: torch.dtype = torch.float32):
        super().__init__()
        check_qtensor(w)
        self.register_buffer("q", w.q)
        self.register_buffer("scale", w.scale)
        self.register_buffer("zero", w.zero)
        self.group, self.bits, self.dtype = w.group, w.bits, dtype
        self.num_embeddings, self.embedding_dim = w.shape

    @property
    def qtensor(self) -> QTensor:
        return QTensor(self.q, self.scale, self.zero, self.group, self.bits)

    def forward(self, tokens: Tensor) -> Tensor:
        from zmzoo.ops.quant import dequantize_rows_ref

        return dequantize_rows_ref(self.qtensor, tokens, self.dtype)


def same_format(ws: list[QuantLinear]) -> bool:
    """Whether quantized linears can be concatenated along the output features into one matrix."""
    a = ws[0]
    return all(isinstance(w, QuantLinear) and (w.bits, w.group, w.in_features, w.q.dtype, w.scale.dtype,
                                               w.zero is None) == (a.bits, a.group, a.in_features, a.q.dtype,
                                                                    a.scale.dtype, a.zero is None) for w in ws)


@torch.no_grad()
def fuse_quant_linears(*linears: QuantLinear) -> tuple[QuantLinear, Tensor | None]:
    """``fuse_linears`` of quantized layers: one QuantLinear over their concatenated rows (integers, scales, zeros),
    each layer's buffers made views into it (no memory added). Returns (the fused layer without bias, bias or None)."""
    def cat(name: str) -> Tensor | None:
        ts = [getattr(m, name) for m in linears]
        return None if ts[0] is None else torch.cat(ts, 0)

    fused = QTensor(cat("q"), cat("scale"), cat("zero"), linears[0].group, linears[0].bits)
    b = torch.cat([m.bias for m in linears], 0) if linears[0].bias is not None else None
    o = 0
    for m in linears:
        n = m.out_features
        for name in ("q", "scale", "zero"):
            t = getattr(fused, name)
            if t is not None:
                setattr(m, name, t[o : o + n])
        if b is not None:
            m.bias = nn.Parameter(b[o : o + n], requires_grad=False)
        o += n
    out = QuantLinear(fused, None, linears[0].dtype)
    out.backend = linears[0].backend
    return out, b

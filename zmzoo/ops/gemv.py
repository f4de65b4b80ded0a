"""Matrix-vector products of a decode step: y = pro(x) @ w.T (+ b) (+ residual) for x of at most ``MAX_ROWS`` rows.

The elementwise work around each product of a decoder layer can ride along inside it, saving the kernel that would
do it (an RMSNorm before q|k|v and gate|up, the SiLU gate before the down projection; the residual adds, which
inductor otherwise fuses into the next RMSNorm) and, against cuBLAS, the split-K reduce kernel it runs after the
output and down projections at batch 1. One of the two prologues at a time:

- ``norm=gamma``: pro(x) = RMSNorm(x) * gamma. Every program reads all of x anyway, so it sums x^2 on the way and
  scales its dot products by rsqrt(mean(x^2) + eps) at the end (the product is linear in x);
- ``silu=True``: x holds gate|up (2K wide) and pro(x) = silu(gate) * up;
- ``residual=r``: the result is r + y, the residual stream's add.

At batch 1 a decode step is bound by reading the weights, and on the H200 cuBLAS reads them at 2.6-3.8 TB/s
depending on the shape (``docs/results/profile-h200-zeromerge.txt``: the attention output projection, 4096 x 4096, in
12.9 us with a split-K reduce kernel of its own, 2.6 TB/s; gate|up, 22016 x 4096, at 3.8 TB/s), against a copy
bandwidth of 4.2 TB/s read + write. This kernel streams the weight once, row-tile by row-tile, with the few input rows
kept in registers: no split-K, no second kernel.

Which launch setting is fastest depends on the shape, the fusion and the GPU, and cuBLAS plus a separate elementwise
kernel is faster for some. So ``tune(products)`` times every setting of ``CANDIDATES`` and the compiled torch
composition on the weights themselves, on the device, before the decode step is compiled, and returns per (rows, N,
K, dtype, fusion) what it measured. ``Transformer.set_gemv`` keeps that table on the model (two models in one process
never see each other's) and gives each product its plan: the kernel's fastest ``Config``, a ``Split``, or None for
the torch composition; ``gemv(..., config=plan)`` runs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from zmzoo.ops._launch import launch, next_pow2, time_graph

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; only backend='triton' needs it
    triton = tl = None

MAX_ROWS = 4  # more rows than this: F.linear (the product stops being a pure weight stream)
BACKENDS = ("torch", "triton", "auto")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class Config(NamedTuple):
    block_n: int  # output features per program
    block_k: int  # weight columns per loop step
    num_warps: int
    num_stages: int
    split: int = 1  # ranges of K computed by separate programs, their sums added by a second kernel (qgemv only)
    fuse: int = 0  # qgemv_a8 only: 1 = quantize the activations inside the product kernel (no launch before it)


# Launch settings tune() tries at 1 row (at 2 and 4 rows BLOCK_K shrinks to keep the accumulator's size): the fp32
# accumulator, BLOCK_N x BLOCK_K elements, stays at 16-64 registers a thread; N / BLOCK_N programs per product. The
# first two came out of a wider sweep on the H200 (bench/launch_sweep.py, docs/results/launch-sweep-h200.txt): the
# fastest there for the output projection with its residual (13.0 us against 13.4 with this list's others) and for
# the down projection without the SiLU prologue (26.7 against 28.8).
CANDIDATES = (
    Config(2, 1024, 1, 2), Config(4, 1024, 4, 2),
    Config(4, 1024, 2, 3), Config(4, 2048, 4, 3), Config(8, 512, 2, 3), Config(8, 1024, 4, 3), Config(8, 1024, 4, 4),
    Config(16, 512, 4, 3), Config(16, 512, 4, 4), Config(16, 1024, 8, 3), Config(32, 256, 4, 3), Config(32, 512, 8, 3),
)


class Fusion(NamedTuple):
    """What rides along in a product (see the module docstring): each changes the kernel's work per weight byte, so
    each is tuned, and weighed against its plain-torch composition, on its own."""
    norm: bool = False
    silu: bool = False
    residual: bool = False

    def __str__(self) -> str:
        return "+".join(n for n, on in self._asdict().items() if on) or "plain"


class Split(NamedTuple):
    """What ``auto`` runs where it measured fastest: the prologue (the SiLU gate, or the RMSNorm) by torch (one
    inductor kernel in a compiled step, ``prologue``), the product and the rest of its fusion by the kernel at
    ``config``. The gate inside the kernel is recomputed by every program over all K columns (and x read twice), which
    cost the down projection ~3 us of its ~27 on the H200, more than the separate gate kernel
    (docs/results/launch-sweep-h200.txt); the norm inside the quantized kernel holds the norm weights' tile in
    registers beside the weights' words (168 registers a thread instead of 128 at int4's widest setting), and cost
    gate|up 15 us of 42 (docs/quantization.md)."""
    config: Config


class Tuned(NamedTuple):
    """What ``tune`` measured for one (rows bucket, N, K, dtype, device, Fusion)."""
    auto: Optional[Config | Split]  # noqa: UP045  # the fastest: a kernel Config, a Split, or None (torch won)
    best: Config  # the kernel's fastest Config with the whole fusion inside (what backend "triton" runs)
    times: dict  # seconds per call of every setting timed, "torch" (the compiled composition) included

    def plan(self, backend: str) -> Optional[Config | Split]:  # noqa: UP045
        """What a product runs under ``backend`` ("auto": the fastest; "triton": the kernel; "torch": None)."""
        return {"auto": self.auto, "triton": self.best}.get(backend)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as HF LlamaRMSNorm: statistics in fp32, scale in the input dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def prologue(x: Tensor, norm: Tensor | None, eps: float, silu: bool) -> Tensor:
    """The input a product without its prologue takes (a ``Split``): ``rms_norm`` of x, or ``silu_mul`` of its two
    halves, or x."""
    if norm is not None:
        return rms_norm(x, norm, eps)
    return silu_mul(*x.chunk(2, dim=-1)) if silu else x


def gemv_ref(x: Tensor, w: Tensor, b: Tensor | None = None, *, norm: Tensor | None = None, eps: float = 1e-6,
             silu: bool = False, residual: Tensor | None = None) -> Tensor:
    """x (..., K) (or (..., 2K) gate|up with ``silu``), w (N, K), b (N,) or None -> (..., N): the plain-torch
    composition (``rms_norm``, ``silu_mul``, ``F.linear``, add), exactly what the model computes without fusion."""
    if norm is not None and silu:
        raise ValueError("gemv: norm and silu are two prologues for different products; pass one")
    if norm is not None:
        x = rms_norm(x, norm, eps)
    if silu:
        x = silu_mul(*x.chunk(2, dim=-1))
    y = F.linear(x, w, b)
    return y if residual is None else residual + y


def _input_tile(x_ptr, g_ptr, offs_m, mask_m, stride_xm, cols, mask_c, K,
                SILU: tl.constexpr, NORM: tl.constexpr):
    """The prologue of the GEMV kernels on one tile of the input: x[offs_m][:, cols] in fp32 (BLOCK_M, len(cols)),
    zero where ``mask_m`` or ``mask_c`` is off. SILU: x holds gate|up and the tile is silu(gate) * up, up K columns
    further. Returns the tile (NORM: times the norm weight g[cols]) and its squares before that weight, which the
    caller sums over K for the RMSNorm's rsqrt (the squares are unused, and compiled away, without NORM). Used by
    ``_gemv_kernel`` and ``zmzoo.ops.qgemv._qgemv_kernel``'s int8 branch; its int4 branch calls ``_input_at``."""
    return _input_at(x_ptr + offs_m[:, None] * stride_xm + cols[None, :], g_ptr + cols[None, :],
                     mask_m[:, None] & mask_c[None, :], mask_c[None, :], K, SILU, NORM)


def _input_at(x_ptrs, g_ptrs, mask_x, mask_g, K, SILU: tl.constexpr, NORM: tl.constexpr):
    """``_input_tile`` on pointers of any shape: ``x_ptrs`` into x (masked by ``mask_x``), ``g_ptrs`` the norm weight
    of the same columns (masked by ``mask_g``, broadcast against x's rows). A mask of None: all in range."""
    if mask_x is None:
        x = tl.load(x_ptrs).to(tl.float32)
        up = tl.load(x_ptrs + K).to(tl.float32) if SILU else x
    else:
        x = tl.load(x_ptrs, mask=mask_x, other=0.0).to(tl.float32)
        up = tl.load(x_ptrs + K, mask=mask_x, other=0.0).to(tl.float32) if SILU else x
    if SILU:
        x = x / (1.0 + tl.exp(-x)) * up
    x2 = x * x
    if NORM:
        if mask_g is None:
            x = x * tl.load(g_ptrs).to(tl.float32)
        else:
            x = x * tl.load(g_ptrs, mask=mask_g, other=0.0).to(tl.float32)
    return x, x2


def _epilogue(y, sq_sum, offs_m, offs_n, mask_m, mask_n, s_ptr, stride_sn, b_ptr, r_ptr, stride_rm, y_ptr,
              stride_ym, K, eps, ROW_SCALE: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr,
              RESIDUAL: tl.constexpr):
    """The GEMV kernels' epilogue: y (BLOCK_M, BLOCK_N), the sums over all of K, times the rows' scales (``ROW_SCALE``:
    zmzoo.ops.qgemv's int8 with one scale a row) and the RMSNorm's rsqrt of ``sq_sum`` (BLOCK_M, the squares of x
    summed over K), plus bias and residual, stored in y's dtype."""
    if ROW_SCALE:
        y = y * tl.load(s_ptr + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if NORM:
        y = y * tl.rsqrt(sq_sum / K + eps)[:, None]
    if HAS_BIAS:
        y += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask_y = mask_m[:, None] & mask_n[None, :]
    if RESIDUAL:
        y += tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask_y, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty), mask=mask_y)


def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, g_ptr, r_ptr, y_ptr,
    M, N, K, stride_xm, stride_wn, stride_rm, stride_ym, eps,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program p computes y[:, p*BLOCK_N : (p+1)*BLOCK_N] for all M rows: it reads its BLOCK_N weight rows once,
    BLOCK_K columns at a time, and accumulates products elementwise in fp32 (no tensor cores: M is 1-4), summing
    over K once at the end rather than with a cross-thread reduction per tile. NORM / SILU / RESIDUAL: see the module
    docstring (gate at columns [0, K) of x, up at [K, 2K))."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # NORM: x^2 summed over the K steps
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_K)
        x, x2 = _input_tile(x_ptr, g_ptr, offs_m, mask_m, stride_xm, offs_k, mask_k, K, SILU, NORM)
        if NORM:
            sq += x2
        acc += x[:, None, :] * w[None, :, :]
    y = tl.sum(acc, axis=2)  # (BLOCK_M, BLOCK_N)
    _epilogue(y, tl.sum(sq, axis=1), offs_m, offs_n, mask_m, mask_n, w_ptr, 0, b_ptr, r_ptr, stride_rm, y_ptr,
              stride_ym, K, eps, False, NORM, HAS_BIAS, RESIDUAL)


def _gemv_impl(x: Tensor, w: Tensor, b: Optional[Tensor], norm: Optional[Tensor], residual: Optional[Tensor],  # noqa: UP045
               eps: float, silu: bool, block_n: int, block_k: int, num_warps: int, num_stages: int) -> Tensor:
    m = x.shape[0]
    n, k = w.shape
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    launch(_gemv_kernel, (triton.cdiv(n, block_n),),
           x, w, b if b is not None else w, norm if norm is not None else w, residual if residual is not None else y,
           y, m, n, k, x.stride(0), w.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0), eps,
           HAS_BIAS=b is not None, NORM=norm is not None, SILU=silu, RESIDUAL=residual is not None,
           BLOCK_M=next_pow2(m), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages)
    return y


if triton is not None:
    _input_at = triton.jit(_input_at)  # called from the kernels (which are jitted on first launch, see _launch)
    _input_tile = triton.jit(_input_tile)
    _epilogue = triton.jit(_epilogue)
    # zmzoo::gemv(Tensor x, Tensor w, Tensor? b, Tensor? norm, Tensor? residual, float eps, bool silu, int block_n,
    #             int block_k, int num_warps, int num_stages) -> Tensor
    _gemv_op = torch.library.triton_op("zmzoo::gemv", _gemv_impl, mutates_args=())


def for_rows(cfg: Config, m: int) -> Config:
    """The setting at m rows: BLOCK_K shrinks so the (BLOCK_M x BLOCK_N x BLOCK_K) accumulator keeps its size."""
    return cfg._replace(block_k=max(32, cfg.block_k // next_pow2(m)))


def gemv_config(m: int) -> Config:
    """The untuned setting: 16 output features a program, a fp32 accumulator of 8K elements (64 registers a thread
    at 4 warps)."""
    return for_rows(Config(16, 512, 4, 3), m)


PLAIN = Fusion()


def tuning_key(m: int, w, fusion: Fusion = PLAIN) -> tuple:
    """The tuning table's key of a product of ``m`` rows by ``w`` with ``fusion``. ``w``: a dense weight, or a
    quantized one (``zmzoo.models.quant.QuantLinear``), whose key's dtype part is its ``QFormat`` (bits, group, zero,
    scale dtype, the activations' dtype and whether they are quantized: its ``act_quant``)."""
    if _is_quantized(w):
        from zmzoo.ops.quant import qformat

        return (next_pow2(m), w.shape[0], w.shape[1], qformat(w, w.dtype, getattr(w, "act_quant", None)), w.q.device,
                fusion)
    return next_pow2(m), w.shape[0], w.shape[1], w.dtype, w.device, fusion


def _is_quantized(w) -> bool:
    return not isinstance(w, Tensor) and hasattr(w, "q") and hasattr(w, "scale")


def _check(x: Tensor, w: Tensor, b: Tensor | None, norm: Tensor | None, silu: bool,
           residual: Tensor | None) -> None:
    if norm is not None and silu:
        raise ValueError("gemv: norm and silu are two prologues for different products; pass one")
    width = x.shape[-1]
    k = width // 2 if silu else width
    if w.dim() != 2 or w.shape[1] != k or (silu and width % 2) or (b is not None and tuple(b.shape) != (w.shape[0],)):
        raise ValueError(f"gemv: x {tuple(x.shape)}, w {tuple(w.shape)}, b {None if b is None else tuple(b.shape)} "
                         f"do not match (w must be (N, K), b (N,), x (..., K){', 2K wide with silu' if silu else ''})")
    if norm is not None and tuple(norm.shape) != (k,):
        raise ValueError(f"gemv: norm weight {tuple(norm.shape)} does not match x {tuple(x.shape)} (must be ({k},))")
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], w.shape[0]):
        raise ValueError(f"gemv: residual {tuple(residual.shape)} does not match the output "
                         f"{(*x.shape[:-1], w.shape[0])}")
    others = {"w": w, "b": b, "norm": norm, "residual": residual}
    if x.dtype not in _DTYPES or any(t is not None and t.dtype != x.dtype for t in others.values()):
        raise TypeError(f"gemv backend='triton' takes one dtype of {_DTYPES}, got x {x.dtype}, "
                        + ", ".join(f"{n} {t.dtype}" for n, t in others.items() if t is not None))
    if w.stride(-1) != 1:
        raise ValueError(f"gemv backend='triton': w needs unit stride along K, got strides {w.stride()}")


def gemv(x: Tensor, w: Tensor, b: Tensor | None = None, *, norm: Tensor | None = None, eps: float = 1e-6,
         silu: bool = False, residual: Tensor | None = None, backend: str = "torch",
         config: Config | Split | None = None) -> Tensor:
    """``gemv_ref``: ``F.linear(pro(x), w, b)`` (+ ``residual``), with pro(x) = ``rms_norm(x, norm, eps)`` when ``norm``
    is given, ``silu_mul`` of x's two halves with ``silu`` (x is gate|up, 2K wide), else x.

    ``backend="triton"`` runs the kernel, prologue and epilogue inside it, when x has at most ``MAX_ROWS`` rows (in
    all its leading dimensions; more run ``gemv_ref``), at ``config`` (default ``gemv_config``); a ``Split`` config
    computes the SiLU gate or the norm apart by torch and runs the rest in the kernel at ``Split.config``.
    ``backend="torch"`` runs ``gemv_ref``. In low precision the kernel rounds once, at the end, where the composition
    rounds the normalised or gated input and the product before the add: results agree to that rounding."""
    if backend not in ("torch", "triton"):
        raise ValueError(f"gemv backend {backend!r} is not one of ('torch', 'triton')")
    fusion = dict(norm=norm, eps=eps, silu=silu, residual=residual)
    if backend == "torch":
        return gemv_ref(x, w, b, **fusion)
    if triton is None:
        raise RuntimeError(f"gemv backend={backend!r} needs the triton package")
    _check(x, w, b, norm, silu, residual)
    width = x.shape[-1]
    m = x.numel() // width if width else 0
    if m == 0 or m > MAX_ROWS:
        return gemv_ref(x, w, b, **fusion)
    if config is None:
        config = gemv_config(m)
    if isinstance(config, Split):
        x, config = prologue(x, norm, eps, silu), config.config
        width, silu, norm = x.shape[-1], False, None
    if config.split != 1:
        raise ValueError(f"gemv backend='triton': a dense weight's kernel does not split K (config {config}); "
                         "split is a setting of zmzoo.ops.qgemv")
    x2 = x.reshape(m, width)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    r2 = None
    if residual is not None:
        r2 = residual.reshape(m, w.shape[0])
        if r2.stride(-1) != 1:
            r2 = r2.contiguous()
    y = torch.ops.zmzoo.gemv(x2, w, b, norm, r2, float(eps), bool(silu), *config[:4])
    return y.reshape(*x.shape[:-1], w.shape[0])


def _composite(x: Tensor, w: Tensor, b: Optional[Tensor], norm: Optional[Tensor],  # noqa: UP045
               residual: Optional[Tensor], silu: bool) -> Tensor:  # noqa: UP045
    return gemv_ref(x, w, b, norm=norm, silu=silu, residual=residual)


@torch.no_grad()
def tune(products: Iterable[Tensor | tuple[Tensor, Fusion]], rows: Sequence[int] = (1,),
         candidates: Sequence[Config] | None = None, calls: int = 24,
         known: dict[tuple, Tuned] | None = None) -> dict[tuple, Tuned]:
    """Time the torch composition and the kernel at every candidate setting for each (rows, weight shape, fusion) on
    its CUDA device, and return what was measured (keys already in ``known`` are taken from it, not timed again).
    ``products``: weights, or (weight, Fusion) pairs for the products that carry a prologue or epilogue. The composition
    is what a compiled decode step runs without the kernel: ``gemv_ref`` under torch.compile (F.linear, and the norm,
    SiLU gate or residual add as one fused elementwise kernel beside it). A product with the SiLU gate is also timed as
    a ``Split``: the gate compiled apart, the kernel at each setting without it; so is a quantized weight's product with
    the norm (the norm compiled apart; a dense weight's is not, its norm costs the kernel little). Weights of one shape
    are cycled through (``calls`` products in a CUDA graph), so several layers' matrices keep the timing off the L2
    cache as in a real step. A setting that fails to launch is skipped. Returns {(rows bucket, N, K, dtype, device,
    Fusion): Tuned} (see ``tuning_key``). Does nothing on CPU (the interpreter's timings mean nothing). ``candidates``:
    the settings at 1 row (``for_rows`` adapts them to more), default ``CANDIDATES`` (dense weights) and
    ``zmzoo.ops.qgemv.candidates(bits)`` (quantized ones).

    Quantized weights (``zmzoo.models.quant.QuantLinear``) are timed the same way with ``zmzoo.ops.qgemv``: the
    composition is ``qgemv_ref`` compiled (dequantize, then F.linear), the kernel ``zmzoo::qgemv``; their key's dtype
    part is the weight's ``QFormat``. Those whose ``act_quant`` is "int8" are timed with ``zmzoo.ops.qgemv_a8``: the
    composition ``qgemv_a8_ref`` compiled, the kernels ``zmzoo::qgemv_a8`` at ``a8_candidates``: each setting both
    unfused (the activations' quantization launch included) and fused (``Config.fuse``: one kernel), no ``Split``
    (the quantization computes the prologue)."""
    from zmzoo.ops.qgemv import candidates as qcandidates  # (zmzoo.ops.qgemv imports this module)
    from zmzoo.ops.qgemv import kernel_config, qcomposite
    from zmzoo.ops.qgemv_a8 import a8_candidates, a8_composite, a8_kernel_config

    groups: dict[tuple, list] = {}
    for item in products:
        w, fusion = item if isinstance(item, tuple) else (item, PLAIN)
        if _is_quantized(w):
            if w.q.device.type == "cuda":
                key = tuning_key(1, w, fusion)
                groups.setdefault((tuple(key[1:3]), key[3], key[4], fusion), []).append(w)
        elif w.device.type == "cuda" and w.dim() == 2 and w.dtype in _DTYPES and w.stride(-1) == 1:
            groups.setdefault((tuple(w.shape), w.dtype, w.device, fusion), []).append(w)
    out = {}
    composite = torch.compile(_composite, fullgraph=True, dynamic=False)
    qcomposite = torch.compile(qcomposite, fullgraph=True, dynamic=False)
    a8_composite = torch.compile(a8_composite, fullgraph=True, dynamic=False)
    pro = torch.compile(prologue, fullgraph=True, dynamic=False)  # a Split's prologue: one graph, not one per setting
    limit = dict(recompile_limit=max(64, torch._dynamo.config.recompile_limit))  # one graph per shape and fusion
    for (shape, dtype, device, fusion), ws in groups.items():
        g = torch.Generator(device=device).manual_seed(0)
        n, k = shape
        quant = _is_quantized(ws[0])
        act = dtype.act_dtype if quant else dtype
        a8 = quant and dtype.act_quant == "int8"
        for m in sorted({next_pow2(r) for r in rows if 0 < r <= MAX_ROWS}):
            key = tuning_key(m, ws[0], fusion)
            if known and key in known:
                out[key] = known[key]
                continue

            def rand(*size):
                return torch.randn(*size, device=device, dtype=act, generator=g)

            norm = 1 + 0.1 * rand(k) if fusion.norm else None
            args = [(rand(m, 2 * k if fusion.silu else k), ws[i % len(ws)], None, norm,
                     rand(m, n) if fusion.residual else None) for i in range(calls)]

            def torch_call(a):
                if not quant:
                    return composite(*a, fusion.silu)
                x, w, _, nw, r = a
                return (a8_composite if a8 else qcomposite)(x, w.q, w.scale, w.zero, nw, r, fusion.silu, w.group,
                                                            w.bits)

            def kernel_call(a, cfg, split=False):
                x, w, b, nw, r = a
                silu = fusion.silu
                if split:  # the prologue apart (compiled), the kernel without it
                    x, nw, silu = pro(x, nw, 1e-6, silu), None, False
                if not quant:
                    return torch.ops.zmzoo.gemv(x, w, b, nw, r, 1e-6, silu, *cfg[:4])
                if a8:
                    return torch.ops.zmzoo.qgemv_a8(x, w.q, w.scale, w.zero, b, nw, r, 1e-6, silu, w.group, w.bits,
                                                    *cfg)
                return torch.ops.zmzoo.qgemv(x, w.q, w.scale, w.zero, None, nw, r, 1e-6, silu, w.group, w.bits,
                                             *kernel_config(cfg, w.bits)[:5])

            with torch._dynamo.config.patch(**limit):
                times: dict = {"torch": time_graph([lambda a=a: torch_call(a) for a in args])}
            if candidates is not None:
                cands = candidates
            elif quant:
                cands = a8_candidates(ws[0].bits) if a8 else qcandidates(ws[0].bits)
            else:
                cands = CANDIDATES
            settings = list(dict.fromkeys(for_rows(c, m) for c in cands))
            if a8:
                settings = list(dict.fromkeys(a8_kernel_config(c) for c in settings))
            elif quant:
                settings = list(dict.fromkeys(kernel_config(c, ws[0].bits) for c in settings))
            splits = [Split(c) for c in settings] if not a8 and (fusion.silu or (fusion.norm and quant)) else []
            for cfg in settings + splits:
                if isinstance(cfg, Split):
                    calls_ = [lambda a=a, c=cfg.config: kernel_call(a, c, True) for a in args]
                else:
                    calls_ = [lambda a=a, c=cfg: kernel_call(a, c) for a in args]
                try:
                    with torch._dynamo.config.patch(**limit):
                        times[cfg] = time_graph(calls_)
                except Exception:  # a setting this GPU cannot run (e.g. out of shared memory): skip it
                    torch.cuda.synchronize(device)
            kernel = {c: t for c, t in times.items() if isinstance(c, Config)}
            if not kernel:
                raise RuntimeError(f"gemv tune: no launch setting ran for a {shape} {dtype} weight at {m} rows "
                                   f"({fusion})")
            best = min(kernel, key=kernel.get)
            fastest = min(times, key=times.get)
            out[key] = Tuned(None if fastest == "torch" else fastest, best, times)
    return out

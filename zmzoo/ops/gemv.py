"""Matrix-vector products of a decode step: y = x @ w.T (+ b) for x of at most ``MAX_ROWS`` rows.

At batch 1 a decode step is bound by reading the weights, and on the H200 cuBLAS reads them at 2.6-3.8 TB/s
depending on the shape (``docs/results/profile-h200-zeromerge.txt``: the attention output projection, 4096 x 4096, in
12.9 us with a split-K reduce kernel of its own, 2.6 TB/s; gate|up, 22016 x 4096, at 3.8 TB/s), against a copy
bandwidth of 4.2 TB/s read + write. This kernel streams the weight once, row-tile by row-tile, with the few input rows
kept in registers: no split-K, no second kernel.

Which launch setting is fastest depends on the shape and the GPU, and F.linear is faster for some shapes. So
``tune(weights)`` times every setting of ``CANDIDATES`` and F.linear on the weights themselves, on the device, before
the decode step is compiled (``Transformer.set_gemv`` calls it), and records per (rows, N, K, dtype) the winner:
``backend="auto"`` then runs whichever was faster, ``backend="triton"`` the kernel's best setting.
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


# Launch settings tune() tries at 1 row (at 2 and 4 rows BLOCK_K shrinks to keep the accumulator's size): the fp32
# accumulator, BLOCK_N x BLOCK_K elements, stays at 16-64 registers a thread; N / BLOCK_N programs per product.
CANDIDATES = (
    Config(4, 1024, 2, 3), Config(4, 2048, 4, 3), Config(8, 512, 2, 3), Config(8, 1024, 4, 3), Config(8, 1024, 4, 4),
    Config(16, 512, 4, 3), Config(16, 512, 4, 4), Config(16, 1024, 8, 3), Config(32, 256, 4, 3), Config(32, 512, 8, 3),
)
# (rows bucket, N, K, dtype, device) -> (what "auto" runs: the fastest Config, or None where F.linear was faster;
# what "triton" runs: the kernel's fastest Config)
_TUNED: dict[tuple, tuple[Optional[Config], Config]] = {}  # noqa: UP045
_TIMES: dict[tuple, dict[str, float]] = {}  # the same key -> seconds per call of each setting ("F.linear" included)


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


def _gemv_impl(x: Tensor, w: Tensor, b: Optional[Tensor], block_n: int, block_k: int, num_warps: int,  # noqa: UP045
               num_stages: int) -> Tensor:
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    launch(_gemv_kernel, (triton.cdiv(n, block_n),),
           x, w, b if b is not None else w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
           HAS_BIAS=b is not None, BLOCK_M=next_pow2(m), BLOCK_N=block_n, BLOCK_K=block_k,
           num_warps=num_warps, num_stages=num_stages)
    return y


if triton is not None:
    # zmzoo::gemv(Tensor x, Tensor w, Tensor? b, int block_n, int block_k, int num_warps, int num_stages) -> Tensor
    _gemv_op = torch.library.triton_op("zmzoo::gemv", _gemv_impl, mutates_args=())


def for_rows(cfg: Config, m: int) -> Config:
    """The setting at m rows: BLOCK_K shrinks so the (BLOCK_M x BLOCK_N x BLOCK_K) accumulator keeps its size."""
    return cfg._replace(block_k=max(32, cfg.block_k // next_pow2(m)))


def gemv_config(m: int) -> Config:
    """The untuned setting: 16 output features a program, a fp32 accumulator of 8K elements (64 registers a thread
    at 4 warps)."""
    return for_rows(Config(16, 512, 4, 3), m)


def _key(m: int, w: Tensor) -> tuple:
    return next_pow2(m), w.shape[0], w.shape[1], w.dtype, w.device


def _check(x: Tensor, w: Tensor, b: Tensor | None) -> None:
    k = x.shape[-1]
    if w.dim() != 2 or w.shape[1] != k or (b is not None and tuple(b.shape) != (w.shape[0],)):
        raise ValueError(f"gemv: x {tuple(x.shape)}, w {tuple(w.shape)}, b "
                         f"{None if b is None else tuple(b.shape)} do not match (w must be (N, K), b (N,))")
    if x.dtype not in _DTYPES or w.dtype != x.dtype or (b is not None and b.dtype != x.dtype):
        raise TypeError(f"gemv backend='triton' takes one dtype of {_DTYPES}, got x {x.dtype}, w {w.dtype}"
                        + (f", b {b.dtype}" if b is not None else ""))
    if w.stride(-1) != 1:
        raise ValueError(f"gemv backend='triton': w needs unit stride along K, got strides {w.stride()}")


def gemv(x: Tensor, w: Tensor, b: Tensor | None = None, *, backend: str = "torch",
         config: Config | None = None) -> Tensor:
    """``F.linear(x, w, b)``. ``backend="triton"`` runs the kernel when x has at most ``MAX_ROWS`` rows (in all its
    leading dimensions; more fall back to F.linear), with ``config``, else the setting ``tune`` found for this shape,
    else ``gemv_config``. ``backend="auto"`` runs the kernel only where ``tune`` measured it faster than F.linear."""
    if backend not in BACKENDS:
        raise ValueError(f"gemv backend {backend!r} is not one of {BACKENDS}")
    if backend == "torch":
        return gemv_ref(x, w, b)
    if triton is None:
        raise RuntimeError(f"gemv backend={backend!r} needs the triton package")
    _check(x, w, b)
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if m == 0 or m > MAX_ROWS:
        return gemv_ref(x, w, b)
    key = _key(m, w)
    if config is None:
        auto, best = _TUNED.get(key, (None, gemv_config(m)))
        config = best if backend == "triton" else auto
        if config is None:
            return gemv_ref(x, w, b)
    x2 = x.reshape(m, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.ops.zmzoo.gemv(x2, w, b, *config)
    return y.reshape(*x.shape[:-1], w.shape[0])


@torch.no_grad()
def tune(weights: Iterable[Tensor], rows: Sequence[int] = (1,), candidates: Sequence[Config] = CANDIDATES,
         calls: int = 24) -> dict[tuple, Optional[Config]]:  # noqa: UP045
    """Time F.linear and the kernel at every candidate setting for each (rows, weight shape) on its CUDA device, and
    record the fastest for ``gemv``. Weights of one shape are cycled through (``calls`` products in a CUDA graph),
    so several layers' matrices keep the timing off the L2 cache as in a real step. A setting that fails to launch
    is skipped. Returns {(rows bucket, N, K, dtype, device): Config or None (F.linear won)} for the shapes tuned.
    Does nothing on CPU (the interpreter's timings mean nothing)."""
    by_shape: dict[tuple, list[Tensor]] = {}
    for w in weights:
        if w.device.type == "cuda" and w.dim() == 2 and w.dtype in _DTYPES and w.stride(-1) == 1:
            by_shape.setdefault((tuple(w.shape), w.dtype, w.device), []).append(w)
    out = {}
    for (shape, dtype, device), ws in by_shape.items():
        g = torch.Generator(device=device).manual_seed(0)
        for m in sorted({next_pow2(r) for r in rows if 0 < r <= MAX_ROWS}):
            key = _key(m, ws[0])
            if key in _TUNED:
                out[key] = _TUNED[key][0]
                continue
            xs = [torch.randn(m, shape[1], device=device, dtype=dtype, generator=g) for _ in range(calls)]
            pairs = [(xs[i], ws[i % len(ws)]) for i in range(calls)]
            times: dict = {"F.linear": time_graph([lambda p=p: F.linear(*p) for p in pairs])}
            for cfg in dict.fromkeys(for_rows(c, m) for c in candidates):
                try:
                    times[cfg] = time_graph([lambda p=p, c=cfg: torch.ops.zmzoo.gemv(*p, None, *c) for p in pairs])
                except Exception:  # a setting this GPU cannot run (e.g. out of shared memory): skip it
                    torch.cuda.synchronize(device)
            kernel = {c: t for c, t in times.items() if c != "F.linear"}
            if not kernel:
                raise RuntimeError(f"gemv tune: no launch setting ran for a {shape} {dtype} weight at {m} rows")
            best = min(kernel, key=kernel.get)
            auto = best if kernel[best] < times["F.linear"] else None
            _TIMES[key], _TUNED[key] = times, (auto, best)
            out[key] = auto
    return out


def tuned() -> dict[tuple, dict]:
    """What ``tune`` measured: {key: {"choice": what "auto" runs (Config or "F.linear"), "best": the kernel's fastest
    Config, "times": {setting: seconds}}}."""
    return {k: {"choice": _TUNED[k][0] or "F.linear", "best": _TUNED[k][1], "times": dict(_TIMES[k])} for k in _TUNED}

"""Launch helpers shared by the Triton kernels of ``zmzoo.ops`` (imports without triton; only launching needs it).

Kernels are written as plain functions and decorated with ``triton.jit`` on first launch, so importing ``zmzoo.ops``
does no Triton work beyond ``import triton``. ``TRITON_INTERPRET=1`` (CPU runs) must be set before triton is first
imported, since triton decorates its own library functions then (tests/conftest.py sets it).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import torch
from torch.library import wrap_triton

try:
    import triton
except ImportError:  # the ops' torch references still work
    triton = None

_JITTED: dict[Callable, object] = {}
_SM_COUNT: dict[int, int] = {}


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def jit(fn: Callable):
    """``triton.jit(fn)``, built once per kernel."""
    if fn not in _JITTED:
        if triton is None:
            raise RuntimeError("the Triton kernels of zmzoo.ops need the triton package")
        _JITTED[fn] = triton.jit(fn)
    return _JITTED[fn]


def launch(kernel: Callable, grid: Sequence[int], *args, **meta) -> None:
    """``wrap_triton(jit(kernel))[grid](*args, **meta)``, so torch.compile and CUDA graphs see the launch.

    Under ``TRITON_INTERPRET=1`` the kernel is an interpreter function that torch cannot trace: a launch on fake
    tensors (torch.compile's shape propagation through the op) is skipped, since it only has to allocate the
    outputs, and a launch on functional tensors (AOTAutograd decomposing the op) is refused rather than dropped.
    """
    fn = jit(kernel)
    if isinstance(fn, triton.runtime.JITFunction):
        wrap_triton(fn)[tuple(grid)](*args, **meta)
        return
    from torch._subclasses.fake_tensor import is_fake
    from torch._subclasses.functional_tensor import FunctionalTensor

    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(isinstance(t, FunctionalTensor) for t in tensors):
        raise RuntimeError("Triton's interpreter (TRITON_INTERPRET=1) cannot be traced by AOTAutograd: compile with "
                           "backend='eager' on CPU, or run on CUDA")
    if any(is_fake(t) for t in tensors):
        return
    fn[tuple(grid)](*args, **meta)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (132, an H200's, elsewhere: the interpreter mimics its grids)."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def time_graph(calls, reps=10) -> float:
    """Seconds per call: ``calls`` (one closure per input copy) captured in one CUDA graph (at least 8 calls),
    replayed ``reps`` times after warm-ups; median of graph time / calls."""
    seq = list(calls) * max(1, math.ceil(8 / len(calls)))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles, autotunes nothing) outside the capture
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in seq:
            f()
    for _ in range(2):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / len(seq))
    del graph
    return statistics.median(times)

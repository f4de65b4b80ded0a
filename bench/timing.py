"""Measuring helpers every bench program shares: device sync, a timer, the copy bandwidth, a timed decode loop, memory
figures, dropping what was compiled, and the environment a result was measured in."""

from __future__ import annotations

import datetime as _dt
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from zmzoo.environment import environment

GiB = 2**30


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """CUDA events on CUDA, ``time.perf_counter`` elsewhere; ``seconds`` after the ``with`` block (synchronizes)."""

    def __init__(self, device: torch.device | str):
        self.cuda = torch.device(device).type == "cuda"
        self.seconds = float("nan")

    def __enter__(self) -> Timer:
        if self.cuda:
            self.t0 = torch.cuda.Event(enable_timing=True)
            self.t1 = torch.cuda.Event(enable_timing=True)
            self.t0.record()
        else:
            self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self.t1.record()
            self.t1.synchronize()
            self.seconds = self.t0.elapsed_time(self.t1) / 1e3
        else:
            self.seconds = time.perf_counter() - self.start


def copy_bandwidth(device: torch.device | str, nbytes: int = 2 * GiB, repeats: int = 10) -> dict[str, Any]:
    """Device-to-device copy bandwidth of an ``nbytes`` buffer in bytes/s (bytes read + written), median of
    ``repeats`` copies after 3 warm-ups: the roofline every bench program reports its figures against."""
    n = nbytes // 4
    src = torch.empty(n, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    times = []
    for _ in range(repeats):
        with Timer(device) as t:
            dst.copy_(src)
        times.append(t.seconds)
    del src, dst
    med = statistics.median(times)
    return {"bytes_per_s": 2 * n * 4 / med, "buffer_bytes": n * 4, "repeats": repeats, "median_s": med,
            "counted": "bytes read + bytes written"}


def time_decode(step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], pos: torch.Tensor, tok: torch.Tensor,
                device: torch.device, steps: int, repeats: int, warmup: int) -> dict[str, Any]:
    """The first (compiling) call and ``warmup`` calls untimed, then ``repeats`` x ``steps`` timed steps.
    ``step(tok, pos)`` returns logits (B, V); ``pos`` advances in place after each step and the next tokens are the
    greedy ones. Returns the first call's seconds and the median seconds per step."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        tok = step(tok, pos).argmax(-1)
        pos += 1
        sync(device)
        first_s = time.perf_counter() - t0
        for _ in range(warmup):
            tok = step(tok, pos).argmax(-1)
            pos += 1
        sync(device)
        times = []
        for _ in range(repeats):
            with Timer(device) as t:
                for _ in range(steps):
                    tok = step(tok, pos).argmax(-1)
                    pos += 1
            times.append(t.seconds)
    med = statistics.median(times)
    return {"first_call_s": first_s, "step_s_median": med / steps, "step_s_all": [x / steps for x in times],
            "steps": steps, "repeats": repeats, "warmup": warmup}


# ---------------------------------------------------------------------------------------------------- memory
def is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def free_memory(device: torch.device) -> None:
    """Drop everything compiled (dynamo's caches and the CUDA graph trees) and return cached device memory: between
    two benchmark configurations, so that the next one neither recompiles against the last one's guards nor finds
    its memory taken."""
    torch._dynamo.reset()
    try:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
    except ImportError:  # a torch without it: dynamo's reset covers it there
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def max_rss_bytes() -> int | None:
    try:
        import resource
    except ImportError:  # not on this platform
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def cudagraph_skips() -> int:
    """Inductor's count of functions it compiled without CUDA graphs (see DESIGN.md: a mutated plain tensor)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


# ---------------------------------------------------------------------------------------------------- environment
def run_env(*, device: torch.device, dtype: torch.dtype, ops: str, prog: str, argv: Sequence[str],
            **extra: Any) -> dict[str, Any]:
    """``zmzoo.environment.environment()`` plus what this run ran with: device, dtype, the ops backend that ran
    (``Generator.backend``), the date and the command line."""
    return {**environment(), "device": str(device), "dtype": str(dtype).replace("torch.", ""), "ops": ops,
            "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": " ".join([prog, *argv]), **extra}

"""``bench.decode --max-batch``: the largest batch that fits per (method, context), and the total tokens/s of the
compiled step there.

The search doubles the batch from 1 until a probe runs out of memory, then bisects to ~6 %: each probe builds the
configuration's Generator (``Generator.with_cache``), prefills a prompt into row 0, copies it into the other rows and
runs one eager decode step. A failure other than out-of-memory ends the search with that error. At the batch found,
the compiled step is timed as ``bench.measure.run_config`` times any configuration (shrinking by 10 % on
out-of-memory: CUDA graphs take some memory of their own).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.measure import budget_for, configure, prefill, run_config
from bench.timing import free_memory, is_oom, sync


def probe_batch(base, ns, method: str, context: int, batch: int) -> tuple[bool, str]:
    """Does ``batch`` fit: caches allocated, one prompt prefilled and copied, one eager decode step? Returns (fits,
    "oom" or the error)."""
    device = base.device
    budget = budget_for(ns, method, context)
    max_seq_len = context + 1 + ns.warmup + ns.max_batch_steps * ns.max_batch_repeats + 1
    gen = None
    try:
        gen = configure(base, method=method, max_seq_len=max_seq_len, batch=batch, kv_budget=budget, compile=False,
                        settings=ns.cache_settings)
        first, _ = prefill(gen, context, ns.seed, all_rows=False)
        with torch.inference_mode():
            gen.decode_step(first, gen.pos)
        sync(device)
        return True, ""
    except Exception as e:
        return False, "oom" if is_oom(e) else f"{type(e).__name__}: {str(e)[:200]}"
    finally:
        del gen
        free_memory(device)


def max_batch_search(base, ns, method: str, context: int) -> dict[str, Any]:
    """The search and the timed run at the batch found (``ns``: max_batch_limit, max_batch_time, max_batch_steps,
    max_batch_repeats and what ``bench.measure`` reads)."""
    t_start = time.perf_counter()
    probes: list[tuple[int, bool]] = []
    lo, hi = 0, None
    b = 1
    reason = ""
    while b <= ns.max_batch_limit and time.perf_counter() - t_start < ns.max_batch_time:
        ok, why = probe_batch(base, ns, method, context, b)
        probes.append((b, ok))
        if not ok:
            hi, reason = b, why
            break
        lo = b
        b *= 2
    if lo and hi is None and b > ns.max_batch_limit:
        reason = f"reached --max-batch-limit {ns.max_batch_limit}"
    if reason not in ("oom", "") and not reason.startswith("reached"):
        return {"method": method, "context": context, "ok": False, "error": reason, "probes": probes}
    # bisect to ~6 % precision
    while hi is not None and hi - lo > max(1, lo // 16) and time.perf_counter() - t_start < ns.max_batch_time:
        mid = (lo + hi) // 2
        ok, why = probe_batch(base, ns, method, context, mid)
        probes.append((mid, ok))
        if ok:
            lo = mid
        elif why == "oom":
            hi = mid
        else:
            return {"method": method, "context": context, "ok": False, "error": why, "probes": probes}
    rec: dict[str, Any] = {"method": method, "context": context, "probe_max_batch": lo, "first_failed": hi,
                           "probes": probes, "search_s": time.perf_counter() - t_start}
    if lo == 0:
        rec.update(ok=False, error="batch 1 does not fit")
        return rec
    b = lo
    for _ in range(4):
        r = run_config(base, ns, method, context, b, ns.max_batch_steps, ns.max_batch_repeats)
        if r["ok"] or not r.get("oom"):
            break
        b = max(1, int(b * 0.9))
    rec.update({k: r.get(k) for k in ("ok", "error", "oom", "tokens_per_s", "step_s", "prefill_s", "decode_peak_bytes",
                                      "cache_bytes", "budget_slots", "compile_s", "pct_roofline", "ops", "gemv")})
    rec["batch"] = b
    return rec

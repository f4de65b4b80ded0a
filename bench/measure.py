"""One zmzoo decode configuration measured: a Generator with its own caches on the loaded weights
(``Generator.with_cache``), a prompt prefilled into every row, the compiled decode step timed, bytes per step and the
bandwidth roofline. ``bench.decode`` and ``bench.maxbatch`` drive it; ``ns`` is ``bench.decode``'s parsed command
line (seed, warmup, prefill_all_rows, kv_ratio / kv_budget, cache_settings, compile, bandwidth, verbose)."""

from __future__ import annotations

import math
import time
import traceback
from typing import Any

import torch

from bench.timing import cudagraph_skips, free_memory, is_oom, peak_bytes, reset_peak, sync, time_decode
from zmzoo.cache import ZeroMergeCache


def compile_arg(ns) -> Any:
    """``--compile``: auto (the Generator's: inductor, CUDA graphs on CUDA), none (eager), or a backend name."""
    return {"auto": True, "none": False}.get(ns.compile, ns.compile)


def budget_for(ns, method: str, context: int) -> int | None:
    """Slots of ``method`` at ``context``: ``--kv-budget``, or ``floor(--kv-ratio * context)``; None for full."""
    if method == "full":
        return None
    return ns.kv_budget if ns.kv_budget else math.floor(ns.kv_ratio * context)


def configure(base, *, method: str, max_seq_len: int, batch: int, kv_budget: int | None, compile: Any,
              settings: dict[str, Any] | None = None):
    """``base.with_cache``: a Generator on ``base``'s weights with caches of its own for this configuration (``method``
    may name a preset: ``zeromerge:retrieval``). What
    its model's GEMV tuning measured for a new batch goes back into ``base``'s table, so the next configuration at
    that batch is not timed again. Drop the returned Generator (then ``free_memory``) before building the next."""
    method, _, preset = method.partition(":")  # "zeromerge:retrieval": a method with a preset
    kw = {} if method == "full" else {**(settings or {}), "kv_budget": kv_budget, "preset": preset or None}
    gen = base.with_cache(method, max_seq_len=max_seq_len, max_batch_size=batch, compile=compile, **kw)
    base.model.gemv_tuning.update(gen.model.gemv_tuning)
    return gen


def replicate_row0(gen) -> None:
    """Copy batch row 0's cache state into every other row (every cache buffer is per row along dim 0)."""
    b = gen.max_batch_size
    if b == 1:
        return
    with torch.inference_mode():
        for cache in gen.model.caches:
            for name, buf in cache.named_buffers():
                if buf.dim() == 0 or buf.shape[0] != b:
                    raise RuntimeError(f"{type(cache).__name__}.{name} {tuple(buf.shape)} is not per row: "
                                       f"use --prefill-all-rows")
                buf[1:].copy_(buf[:1].expand_as(buf[1:]))
        gen.pos[1:] = gen.pos[0]


def prefill(gen, context: int, seed: int, all_rows: bool) -> tuple[torch.Tensor, float]:
    """Prefill a random prompt of ``context`` tokens into every row (row 0 prefilled, then copied into the others
    unless ``all_rows``); returns (first tokens (B,), seconds of row 0's prefill)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, gen.args.vocab_size, (1, context), generator=g).to(gen.device)
    b = gen.max_batch_size
    with torch.inference_mode():
        gen.pos.zero_()
        sync(gen.device)
        t0 = time.perf_counter()
        (logits,) = gen.prefill(ids.tolist())  # with the caches' prefill draft (a lookahead), as generate runs it
        sync(gen.device)
        seconds = time.perf_counter() - t0
        if all_rows:
            gen.prefill(ids.tolist() * b)
        else:
            replicate_row0(gen)
        first = logits.argmax(-1).expand(b).contiguous()
    return first, seconds


# ---------------------------------------------------------------------------------------------------- roofline
def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads (``Transformer.weight_nbytes``'s ``weight_bytes_per_step``): every
    parameter and quantized buffer (integers, scales, zeros) once, a tied embedding once as the output projection; an
    untied embedding table is not counted (a step reads one row of it)."""
    return model.weight_nbytes()["weight_bytes_per_step"]


def kv_bytes_per_step(gen, context: int, batch: int) -> int:
    """KV-cache bytes one decode step reads: full, ``2 * layers * kv_heads * head_dim * itemsize`` per token
    attended; compressed, the same over the budget's slots, plus the fp32 ``w`` read where compensation is on and the
    fp32 scores read and written where decode scoring is on; times the batch."""
    a = gen.model.args  # a tensor-parallel rank's own KV heads: the roofline is per rank
    item = torch.empty((), dtype=gen.dtype).element_size()
    cfg = gen.cache_config
    per_token = 2 * a.n_layers * a.n_kv_heads * a.head_dim * item
    if cfg.method == "full":
        attended = context
        if a.sliding_window is not None:
            attended = min(attended, a.sliding_window)
        return batch * per_token * attended
    slots = cfg.budget
    total = per_token * slots
    cache = gen.model.caches[0]
    if isinstance(cache, ZeroMergeCache) and cache.compensate:
        total += a.n_layers * a.n_kv_heads * slots * 4  # w read
    if isinstance(cache, ZeroMergeCache) and cache.decode_scores:
        total += 2 * a.n_layers * a.n_kv_heads * slots * 4  # scores read + written
    return batch * total


# ---------------------------------------------------------------------------------------------------- measure
def error_record(e: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": f"{type(e).__name__}: {str(e)[:300]}", "oom": is_oom(e)}


def measure(gen, ns, rec: dict[str, Any], context: int, steps: int, repeats: int) -> None:
    """Prefill a prompt of ``context`` tokens into ``gen`` and time its decode step; fills ``rec``."""
    device, batch = gen.device, gen.max_batch_size
    skips0 = cudagraph_skips()
    cs = gen.cache_stats()
    rec.update(cache_bytes=cs["cache_bytes"], full_cache_bytes=cs["full_cache_bytes"], max_seq_len=gen.max_seq_len,
               ops=gen.backend, gemv=gen.gemv, weight_bytes_in_memory=cs["weight_bytes"],
               quantization=cs["quantization"])
    # one untimed prefill of the same length first (kernel JIT, autotuning and compiled prefill kernels for these
    # shapes); the timed prefill then overwrites every piece of row state
    g = torch.Generator().manual_seed(ns.seed + 1)
    with torch.inference_mode():
        gen.prefill(torch.randint(0, gen.args.vocab_size, (1, context), generator=g).tolist())
    sync(device)
    reset_peak(device)
    first, pre_s = prefill(gen, context, ns.seed, ns.prefill_all_rows)
    rec.update(prefill_s=pre_s, prefill_tokens_per_s=context / pre_s, prefill_peak_bytes=peak_bytes(device))
    reset_peak(device)
    t = time_decode(gen.decode_step, gen.pos, first, device, steps, repeats, ns.warmup)
    rec.update(decode_peak_bytes=peak_bytes(device), compile_s=t["first_call_s"], step_s=t["step_s_median"],
               step_s_all=t["step_s_all"], steps=steps, repeats=repeats, warmup=ns.warmup)
    rec["tokens_per_s"] = batch / t["step_s_median"]
    wb = weight_bytes(gen.model)
    attended = context + 1 + ns.warmup + steps * repeats // 2  # tokens attended on average while timed
    kvb = kv_bytes_per_step(gen, attended, batch)
    rec.update(weight_bytes=wb, kv_bytes_per_step=kvb, bytes_per_step=wb + kvb)
    rec["roofline_tokens_per_s"] = batch * ns.bandwidth / (wb + kvb)
    rec["pct_roofline"] = 100.0 * rec["tokens_per_s"] / rec["roofline_tokens_per_s"]
    rec["cudagraph_skips"] = cudagraph_skips() - skips0
    rec["ok"] = True


def run_group(base, ns, method: str, contexts: list[int], batch: int, plans: dict[int, tuple[int, int]],
              report=None) -> list[dict[str, Any]]:
    """Measure ``method`` at ``contexts`` on one Generator (one compile): caches for the largest context plus the new
    tokens. Used for one context at a time, or for all contexts of a compressed method whose budget does not depend
    on the context (its caches have the same shapes at every context; only the RoPE table is longer). Everything it
    built is dropped before it returns."""
    device = base.device
    new_tokens = max(1 + ns.warmup + st * rp + 1 for st, rp in plans.values())
    max_seq_len = max(contexts) + new_tokens
    budget = budget_for(ns, method, contexts[0])
    recs = []
    try:
        gen = configure(base, method=method, max_seq_len=max_seq_len, batch=batch, kv_budget=budget,
                        compile=compile_arg(ns), settings=ns.cache_settings)
    except Exception as e:
        gen = None
        recs = [{"method": method, "context": c, "batch": batch, "budget_slots": budget, **error_record(e)}
                for c in contexts]
        if not is_oom(e) and ns.verbose:
            traceback.print_exc()
        for rec in recs if report else []:
            report(rec)
    for context in contexts if gen is not None else []:
        steps, repeats = plans[context]
        rec: dict[str, Any] = {"method": method, "context": context, "batch": batch, "budget_slots": budget,
                               "shared_generator": len(contexts) > 1}
        try:
            measure(gen, ns, rec, context, steps, repeats)
        except Exception as e:
            rec.update(error_record(e))
            if not is_oom(e) and ns.verbose:
                traceback.print_exc()
        recs.append(rec)
        if report:
            report(rec)
    del gen
    free_memory(device)
    return recs


def run_config(base, ns, method: str, context: int, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    """One (method, context, batch) measurement on its own Generator; frees everything it built."""
    return run_group(base, ns, method, [context], batch, {context: (steps, repeats)})[0]

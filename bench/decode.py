"""Decode benchmark: tokens/s, memory and % of the memory-bandwidth roofline of zmzoo's compiled decode step.

    python bench/decode.py --model llama2-7b --weights random --contexts 4096,16384,40960,54000 \
        --methods full,zeromerge,h2o,streaming --kv-ratio 0.05 --batch 1 --out out/decode

For every (method, context): caches for ``max_seq_len = context + new tokens`` on the one loaded model (weights are
loaded once; caches and the Generator are rebuilt per configuration and everything compiled is dropped in between),
a random prompt of ``context`` tokens prefilled (timed after one untimed prefill of the same length, synchronized:
scoring and compression included; HF's prefill is chunked and not warmed up), then the
Generator's compiled decode step (``torch.compile(fullgraph=True, mode="reduce-overhead")``: CUDA graphs) warmed up
and timed over ``steps`` steps with CUDA events, ``repeats`` times; the median is reported. On CPU the same runs with
``time.perf_counter`` and no CUDA graphs (a smoke test, not a measurement).

Budgets: ``--kv-ratio r`` keeps ``floor(r * context)`` slots (a fraction of the prompt, as the paper's throughput runs
do); ``--kv-budget n`` keeps ``n`` slots at every context.

Roofline: bytes one decode step must move = weights (every parameter once; a tied embedding counted once as the output
projection; an untied embedding table not counted, since a step reads one row of it) + KV bytes
(full: ``2 * layers * kv_heads * head_dim * itemsize * tokens attended``; compressed: the same over the budget's slots,
plus the fp32 ``w`` array read when compensation is on and the fp32 scores read and written when decode scoring is
on), times the batch for the KV part. Roofline tokens/s = batch * copy bandwidth / bytes, the copy bandwidth measured at
start (device-to-device copy, bytes read + written, median of repeats).

``--max-batch``: for each (method, context), the largest batch that fits (doubling then bisection over batch sizes,
each probe allocating the caches, prefilling a prompt and running one decode step; out-of-memory is caught) and the
total tokens/s of the compiled step at that batch. Rows are filled by prefilling row 0 and copying its cache state to
the other rows (every cache buffer is per row along dim 0; ``--prefill-all-rows`` prefills each row instead).

Peers (``--peers hf``): HF transformers' LlamaForCausalLM with the same dimensions, random weights from the same seed,
a ``StaticCache`` and ``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)``; skipped with the reason
printed when transformers is missing or the run fails.

Writes ``OUT/results.json`` (every figure and the environment; rewritten after every configuration, so a run cut
short keeps what it measured) and ``OUT/decode.png``; prints a table.

Wall time on the H200 (torch 2.11, Triton ops): compiling the 32-layer LLaMA-2-7B decode step takes 50-70 s per cache
shape and dominates; the timed steps take seconds. With ``--kv-budget`` a compressed method has the same cache shapes
at every context, so it runs all contexts on one Generator (one compile; ``--no-share`` to turn that off); with
``--kv-ratio`` every (method, context) compiles. The issue's setting with ``--kv-budget 2048`` compiles 7 times
(about 7-8 minutes), with ``--kv-ratio 0.05`` 16 times; ``--layers 4`` keeps 7B widths at a fraction of the compile
time, ``--time-limit`` bounds a run. Pipe through ``tee`` (and ``PYTHONUNBUFFERED=1``) to keep the log.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import inspect
import json
import math
import platform
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

from zmzoo.environment import environment

# the tiny config of --tiny (CPU smoke tests): the architecture of --model with these dimensions
TINY = {"n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 96, "vocab_size": 128}
GiB = 2**30


# ---------------------------------------------------------------------------------------------------- helpers
def _is_oom(e: BaseException) -> bool:
    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and "out of memory" in str(e).lower()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Drop everything compiled (dynamo caches and CUDA graph trees) and return cached device memory."""
    torch._dynamo.reset()
    try:
        from torch._inductor.cudagraph_trees import reset_cudagraph_trees

        reset_cudagraph_trees()
    except Exception:  # older or newer torch without it: dynamo's reset covers it there
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

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except Exception:
        return None


class Timer:
    """CUDA events on CUDA, perf_counter elsewhere; ``elapsed()`` in seconds (synchronizes)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

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


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> dict[str, Any]:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), median of ``repeats`` after 3 warm-ups."""
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


def gemv_report() -> list[dict[str, Any]]:
    """What ``zmzoo.ops.gemv.tune`` measured (empty unless --gemv triton/auto on CUDA), printed and kept in the JSON:
    per (rows, N, K, fusion) the chosen setting and the microseconds of the compiled torch composition (F.linear and
    its fused elementwise kernel) and of the kernel's best setting."""
    from zmzoo.ops.gemv import Split, tuned

    rows = []
    for (m, n, k, dtype, _, fusion), rec in tuned().items():
        best, times, choice = rec["best"], rec["times"], rec["choice"]
        if isinstance(choice, Split):
            choice_s = f"silu by torch + triton {tuple(choice.config)} ({times[choice] * 1e6:.1f} us)"
        else:
            choice_s = choice if isinstance(choice, str) else "triton " + repr(tuple(choice))
        row = {"rows": m, "n": n, "k": k, "dtype": str(dtype).replace("torch.", ""), "fusion": str(fusion),
               "choice": choice_s, "torch_us": times["torch"] * 1e6, "triton_us": times[best] * 1e6,
               "triton_setting": tuple(best)}
        rows.append(row)
        print(f"[gemv] rows={m} {n} x {k} {fusion}: torch {row['torch_us']:.1f} us, kernel {row['triton_us']:.1f} us "
              f"at (BLOCK_N, BLOCK_K, warps, stages)={row['triton_setting']} -> {row['choice']}")
    return rows


def parse_list(s: str, typ=str) -> list:
    return [typ(x) for x in s.split(",") if x.strip()]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once (a tied embedding once, as the output
    projection); an untied embedding table is not counted (a step reads one row of it)."""
    seen: set[int] = set()
    total = 0
    emb = model.tok_embeddings.weight
    tied = model.output.weight is emb
    for p in model.parameters():
        if p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        if p is emb and not tied:
            continue
        total += p.numel() * p.element_size()
    return total


def kv_bytes_per_step(gen, context: int, batch: int) -> int:
    """KV-cache bytes one decode step reads (see the module docstring)."""
    a = gen.args
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
    if getattr(cache, "compensate", False):
        total += a.n_layers * a.n_kv_heads * slots * 4  # w read
    if getattr(cache, "decode_scores", False):
        total += 2 * a.n_layers * a.n_kv_heads * slots * 4  # scores read + written
    return batch * total


# ---------------------------------------------------------------------------------------------------- zmzoo side
def drop_caches(model: torch.nn.Module) -> None:
    """Detach the layers' caches from ``model`` so that their memory can go (the model holds the last caches it was
    given: without this, every configuration was allocated while the previous one's caches were still alive, which
    halved the batch --max-batch could find)."""
    for layer in model.layers:
        layer.attention.kv_cache = None


def with_caches(base, *, method: str, max_seq_len: int, batch: int, kv_budget: int | None, compile: Any,
                settings: dict[str, Any] | None = None):
    """A new Generator on ``base``'s model (same weights, tokenizer, ops backend) with freshly built caches; the
    caches it had before are released first."""
    from zmzoo.cache import build_caches, resolve_cache_config
    from zmzoo.generate import Generator

    drop_caches(base.model)
    free_memory(base.device)
    a = base.args
    kw = dict(settings or {})
    if method != "full":
        kw["kv_budget"] = kv_budget
    cfg = resolve_cache_config(max_seq_len=max_seq_len, method=method, **kw)
    caches = build_caches(cfg, n_layers=a.n_layers, batch_size=batch, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads,
                          head_dim=a.head_dim, max_seq_len=max_seq_len, dtype=base.dtype, device=base.device,
                          sliding_window=a.sliding_window, backend=base.backend)
    base.model.setup_caches(caches, max_seq_len)
    return Generator(base.model, base.tokenizer, a, cfg, device=base.device, dtype=base.dtype,
                     max_seq_len=max_seq_len, max_batch_size=batch, compile=compile, backend=base.backend)


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
    """Prefill a random prompt of ``context`` tokens into every row; returns (first tokens (B,), seconds of row 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, gen.args.vocab_size, (1, context), generator=g).to(gen.device)
    b = gen.max_batch_size
    with torch.inference_mode():
        gen.pos.zero_()
        sync(gen.device)
        t0 = time.perf_counter()
        logits = gen.model.prefill(ids, row=0)
        gen.pos[0] = context
        sync(gen.device)
        seconds = time.perf_counter() - t0
        if all_rows:
            for r in range(1, b):
                gen.model.prefill(ids, row=r)
                gen.pos[r] = context
        else:
            replicate_row0(gen)
        first = logits.argmax(-1).expand(b).contiguous()
    return first, seconds


def time_decode(step, pos: torch.Tensor, tok: torch.Tensor, device, steps: int, repeats: int,
                warmup: int) -> dict[str, Any]:
    """Compile call + ``warmup`` calls (excluded), then ``repeats`` x ``steps`` timed steps. ``step(tok, pos)``
    returns logits (B, V); pos advances in place after each step and the next tokens are the greedy ones."""
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


def cudagraph_skips() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["cudagraph_skips"])
    except Exception:
        return 0


def probe_ops(ns, device, dtype) -> str:
    """The ops backend to use: ``ns.ops``, except that "auto" falls back to "torch" when the Triton kernels fail
    (not written yet, or broken) on a tiny model of the same family, eager and compiled as the benchmark compiles,
    for every method asked for."""
    from zmzoo.ops import resolve_backend

    backend = resolve_backend(ns.ops, device)
    if backend != "triton" or ns.ops != "auto":
        return backend
    import zmzoo

    try:
        tiny = zmzoo.load(ns.model, weights="random", device=device, dtype=dtype, compile=False, max_seq_len=64,
                          args_overrides={**TINY, "max_position_embeddings": 64}, ops="triton", gemv="torch")
        for m in ns.methods:
            g = with_caches(tiny, method=m, max_seq_len=64, batch=2, kv_budget=16 if m != "full" else None,
                            compile=compile_arg(ns))
            first, _ = prefill(g, 40, 0, all_rows=True)
            with torch.inference_mode():
                first = g.model.decode(first, g.pos).argmax(-1)  # eager
                g.pos += 1
                for _ in range(4):  # compiled (and CUDA graph recorded and replayed)
                    first = g.decode_step(first, g.pos).argmax(-1)
                    g.pos += 1
            sync(device)
            del g
            free_memory(device)
    except Exception as e:
        msg = str(e).strip().splitlines()
        print(f"[decode] ops=auto: the Triton ops failed on a tiny model ({type(e).__name__}: "
              f"{' / '.join(x.strip() for x in msg[-2:])[:300]}); "
              f"using ops=torch (the plain-torch references)")
        return "torch"
    finally:
        free_memory(device)
    return "triton"


def compile_arg(ns) -> Any:
    return {"auto": True, "none": False}.get(ns.compile, ns.compile)


def budget_for(ns, method: str, context: int) -> int | None:
    if method == "full":
        return None
    return ns.kv_budget if ns.kv_budget else math.floor(ns.kv_ratio * context)


def measure(gen, ns, rec: dict[str, Any], context: int, steps: int, repeats: int) -> None:
    """Prefill a prompt of ``context`` tokens into ``gen`` and time its decode step; fills ``rec``."""
    device, batch = gen.device, gen.max_batch_size
    skips0 = cudagraph_skips()
    cs = gen.cache_stats()
    rec.update(cache_bytes=cs["cache_bytes"], full_cache_bytes=cs["full_cache_bytes"], max_seq_len=gen.max_seq_len)
    # one untimed prefill of the same length first (kernel JIT and autotuning for these shapes); the timed prefill
    # then overwrites every piece of row state
    g = torch.Generator().manual_seed(ns.seed + 1)
    with torch.inference_mode():
        gen.model.prefill(torch.randint(0, gen.args.vocab_size, (1, context), generator=g).to(device), row=0)
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
    on the context (its caches have the same shapes at every context; only the RoPE table is longer)."""
    device = base.device
    new_tokens = max(1 + ns.warmup + st * rp + 1 for st, rp in plans.values())
    max_seq_len = max(contexts) + new_tokens
    budget = budget_for(ns, method, contexts[0])
    recs = []
    gen = None
    try:
        gen = with_caches(base, method=method, max_seq_len=max_seq_len, batch=batch, kv_budget=budget,
                          compile=compile_arg(ns), settings=ns.cache_settings)
    except Exception as e:
        recs = [{"method": method, "context": c, "batch": batch, "budget_slots": budget, "ok": False,
                 "error": f"{type(e).__name__}: {str(e)[:300]}", "oom": _is_oom(e)} for c in contexts]
        gen = None
    for context in contexts if gen is not None else []:
        steps, repeats = plans[context]
        rec: dict[str, Any] = {"method": method, "context": context, "batch": batch, "budget_slots": budget,
                               "shared_generator": len(contexts) > 1}
        try:
            measure(gen, ns, rec, context, steps, repeats)
        except Exception as e:
            rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}", oom=_is_oom(e))
            if not _is_oom(e) and ns.verbose:
                traceback.print_exc()
        recs.append(rec)
        if report:
            report(rec)
    del gen
    drop_caches(base.model)
    free_memory(device)
    return recs


def run_config(base, ns, method: str, context: int, batch: int, steps: int, repeats: int) -> dict[str, Any]:
    """One (method, context, batch) measurement on its own Generator; frees everything it built."""
    return run_group(base, ns, method, [context], batch, {context: (steps, repeats)})[0]


# ---------------------------------------------------------------------------------------------------- max batch
def probe_batch(base, ns, method: str, context: int, batch: int) -> tuple[bool, str]:
    """Does ``batch`` fit: caches allocated, one prompt prefilled and copied, one eager decode step?"""
    device = base.device
    budget = budget_for(ns, method, context)
    max_seq_len = context + 1 + ns.warmup + ns.max_batch_steps * ns.max_batch_repeats + 1
    gen = None
    try:
        gen = with_caches(base, method=method, max_seq_len=max_seq_len, batch=batch, kv_budget=budget, compile=False,
                          settings=ns.cache_settings)
        first, _ = prefill(gen, context, ns.seed, all_rows=False)
        with torch.inference_mode():
            gen.decode_step(first, gen.pos)
        sync(device)
        return True, ""
    except Exception as e:
        if not _is_oom(e):
            return False, f"{type(e).__name__}: {str(e)[:200]}"
        return False, "oom"
    finally:
        del gen
        drop_caches(base.model)
        free_memory(device)


def max_batch_search(base, ns, method: str, context: int) -> dict[str, Any]:
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
    # timed compiled run at the found batch; shrink on out-of-memory (CUDA graphs take some memory of their own)
    b = lo
    for _ in range(4):
        r = run_config(base, ns, method, context, b, ns.max_batch_steps, ns.max_batch_repeats)
        if r["ok"] or not r.get("oom"):
            break
        b = max(1, int(b * 0.9))
    rec.update({k: r.get(k) for k in ("ok", "error", "tokens_per_s", "step_s", "prefill_s", "decode_peak_bytes",
                                      "cache_bytes", "budget_slots", "compile_s", "pct_roofline")})
    rec["batch"] = b
    return rec


# ---------------------------------------------------------------------------------------------------- HF peer
def hf_peer(args, ns, device, dtype, context: int, steps: int, repeats: int) -> dict[str, Any]:
    """HF transformers LlamaForCausalLM + StaticCache + compiled forward, the same shape and timing as zmzoo."""
    rec: dict[str, Any] = {"peer": "hf-static", "method": "hf-static", "context": context, "batch": ns.batch}
    model = cache = None
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

        rec["transformers"] = transformers.__version__
        if args.model_type != "llama" or args.qkv_bias or args.qk_norm:
            raise RuntimeError(f"the HF peer builds LlamaForCausalLM; {args.name} is {args.model_type}")
        new_tokens = 1 + ns.warmup + steps * repeats + 1
        max_seq_len = context + new_tokens
        cfg = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.intermediate_size,
                          num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                          num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
                          max_position_embeddings=max(max_seq_len, args.max_position_embeddings),
                          rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta,
                          tie_word_embeddings=args.tie_embeddings)
        cfg._attn_implementation = "sdpa"
        free_memory(device)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype)
        model.eval().requires_grad_(False)
        g = torch.Generator(device=device).manual_seed(ns.seed)
        for name, p in model.named_parameters():  # zmzoo's random_init_ scheme
            if name.endswith("norm.weight"):
                p.data.fill_(1.0)
            else:
                p.data.normal_(0.0, 0.02, generator=g)
        model.generation_config.cache_implementation = "static"
        params = inspect.signature(model.forward).parameters
        cache_kw = "cache" if "cache" in params else "past_key_values"
        use_cache_position = "cache_position" in params
        sc_params = inspect.signature(StaticCache.__init__).parameters
        sc_kw: dict[str, Any] = {"config": cfg, "max_cache_len": max_seq_len}
        for k, v in (("max_batch_size", ns.batch), ("batch_size", ns.batch), ("device", device), ("dtype", dtype)):
            if k in sc_params:
                sc_kw[k] = v
        cache = StaticCache(**sc_kw)
        gen_ids = torch.Generator().manual_seed(ns.seed)
        ids = torch.randint(0, args.vocab_size, (ns.batch, context), generator=gen_ids).to(device)
        reset_peak(device)
        chunk = ns.hf_prefill_chunk
        with torch.inference_mode():
            sync(device)
            t0 = time.perf_counter()
            out = None
            for a in range(0, context, chunk):
                b = min(context, a + chunk)
                positions = torch.arange(a, b, device=device)
                kw: dict[str, Any] = {cache_kw: cache, "use_cache": True,
                                      "position_ids": positions.unsqueeze(0).expand(ns.batch, -1)}
                if use_cache_position:
                    kw["cache_position"] = positions
                if "logits_to_keep" in params:
                    kw["logits_to_keep"] = 1
                out = model(input_ids=ids[:, a:b], **kw)
            tok = out.logits[:, -1].argmax(-1)
            sync(device)
            rec["prefill_s"] = time.perf_counter() - t0
        rec["prefill_peak_bytes"] = peak_bytes(device)
        rec["prefill_chunk"] = chunk
        fwd = model.forward
        if ns.compile != "none":
            if ns.compile == "auto":
                mode = "reduce-overhead" if device.type == "cuda" else None
                fwd = torch.compile(model.forward, mode=mode, fullgraph=True)
            else:
                fwd = torch.compile(model.forward, fullgraph=True, backend=ns.compile)
        with torch.inference_mode():
            pos = torch.full((ns.batch,), context, dtype=torch.int64, device=device)

        def step(tok: torch.Tensor, pos: torch.Tensor, hf_cache=cache) -> torch.Tensor:
            kw: dict[str, Any] = {cache_kw: hf_cache, "use_cache": True, "position_ids": pos.view(-1, 1)}
            if use_cache_position:
                kw["cache_position"] = pos[:1]
            return fwd(input_ids=tok.view(-1, 1), **kw).logits[:, -1].clone()

        reset_peak(device)
        t = time_decode(step, pos, tok, device, steps, repeats, ns.warmup)
        rec.update(decode_peak_bytes=peak_bytes(device), compile_s=t["first_call_s"], step_s=t["step_s_median"],
                   step_s_all=t["step_s_all"], steps=steps, repeats=repeats, warmup=ns.warmup,
                   max_seq_len=max_seq_len, tokens_per_s=ns.batch / t["step_s_median"])
        item = torch.empty((), dtype=dtype).element_size()
        wb = sum(p.numel() * p.element_size() for p in {p.data_ptr(): p for p in model.parameters()}.values())
        if not args.tie_embeddings:
            wb -= model.model.embed_tokens.weight.numel() * item
        # HF's SDPA over a static cache reads all max_cache_len slots (masked), not only the filled ones
        kvb = ns.batch * 2 * args.n_layers * args.n_kv_heads * args.head_dim * item * max_seq_len
        rec.update(weight_bytes=wb, kv_bytes_per_step=kvb, bytes_per_step=wb + kvb,
                   roofline_tokens_per_s=ns.batch * ns.bandwidth / (wb + kvb))
        rec["pct_roofline"] = 100.0 * rec["tokens_per_s"] / rec["roofline_tokens_per_s"]
        rec["ok"] = True
    except Exception as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}", oom=_is_oom(e))
        if ns.verbose:
            traceback.print_exc()
    finally:
        model = cache = None
        free_memory(device)
    return rec


# ---------------------------------------------------------------------------------------------------- output
def fmt_bytes(b: int | None, unit: int = GiB) -> str:
    return "-" if b is None else f"{b / unit:.2f}"


def print_table(rows: list[dict[str, Any]], cuda: bool) -> None:
    mem = "GiB" if cuda else "(n/a on CPU)"
    head = (f"{'method':<11} {'context':>7} {'batch':>5} {'slots':>6} {'prefill s':>9} {'pre peak':>8} "
            f"{'tok/s':>9} {'dec peak':>8} {'cache MiB':>9} {'MB/step':>8} {'roof tok/s':>10} {'% roof':>6} "
            f"{'compile s':>9}")
    print(f"peak memory columns in {mem}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if not r.get("ok"):
            what = "" if str(r.get("error", "")).startswith("skipped") else "FAILED: "
            print(f"{r['method']:<11} {r['context']:>7} {r.get('batch', '-'):>5}  {what}{r.get('error')}")
            continue
        slots = r.get("budget_slots") or "all"
        cache_mib = f"{r['cache_bytes'] / 2**20:.1f}" if r.get("cache_bytes") is not None else "-"
        print(f"{r['method']:<11} {r['context']:>7} {r['batch']:>5} {slots!s:>6} {r['prefill_s']:>9.3f} "
              f"{fmt_bytes(r.get('prefill_peak_bytes')):>8} {r['tokens_per_s']:>9.1f} "
              f"{fmt_bytes(r.get('decode_peak_bytes')):>8} {cache_mib:>9} {r['bytes_per_step'] / 1e6:>8.1f} "
              f"{r['roofline_tokens_per_s']:>10.1f} {r['pct_roofline']:>6.1f} {r['compile_s']:>9.1f}")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["results"] + results.get("peers", []) if r.get("ok")]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(r["method"], []).append(r)
    cuda = results["env"]["device"].startswith("cuda")
    for name, rs in series.items():
        rs = sorted(rs, key=lambda r: r["context"])
        x = [r["context"] for r in rs]
        style = "--" if name.startswith("hf") else "-"
        axes[0].plot(x, [r["tokens_per_s"] for r in rs], style, marker="o", label=name)
        axes[1].plot(x, [r["pct_roofline"] for r in rs], style, marker="o", label=name)
        if cuda:
            axes[2].plot(x, [(r.get("decode_peak_bytes") or 0) / GiB for r in rs], style, marker="o", label=name)
        else:
            axes[2].plot(x, [(r.get("cache_bytes") or 0) / 2**20 for r in rs], style, marker="o", label=name)
    dev = results["env"].get("gpu") or "CPU"
    axes[0].set(xlabel="context (tokens)", ylabel="decode tokens/s", title=f"decode throughput ({dev})")
    axes[1].set(xlabel="context (tokens)", ylabel="% of roofline", title="% of bandwidth roofline")
    if cuda:
        axes[2].set(xlabel="context (tokens)", ylabel="GiB", title="peak GPU memory during decode")
    else:
        axes[2].set(xlabel="context (tokens)", ylabel="MiB", title="KV cache size (CPU run: no GPU memory)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    mb = [r for r in results.get("max_batch", []) if r.get("ok")]
    fig.suptitle(f"zmzoo decode: {results['config']['model']} ({results['config']['weights']}), "
                 f"batch {results['config']['batch']}, {results['config']['budget']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if mb:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        labels = [f"{r['method']}\n{r['context']}" for r in mb]
        ax.bar(labels, [r["tokens_per_s"] for r in mb])
        for i, r in enumerate(mb):
            ax.text(i, r["tokens_per_s"], f"b={r['batch']}", ha="center", va="bottom", fontsize=8)
        ax.set(ylabel="total tokens/s at the largest batch that fits", title="max-batch throughput")
        fig.tight_layout()
        fig.savefig(path.with_name("decode_max_batch.png"), dpi=110)
        plt.close(fig)


def merge(paths: list[str], out: Path, plot_: bool = True) -> int:
    """Merge the results.json of separate runs: rows concatenated (each keeps its run's bandwidth and roofline), the
    environment and config of the first run, and every run's own under "runs"."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    merged: dict[str, Any] = {
        "env": runs[0]["env"], "config": dict(runs[0]["config"]), "bandwidth": runs[0]["bandwidth"],
        "results": [], "peers": [], "max_batch": [],
        "runs": [{"file": str(p), "env": r["env"], "config": r["config"], "bandwidth": r["bandwidth"],
                  "wall_s": r.get("wall_s")} for p, r in zip(paths, runs)],
    }
    for i, r in enumerate(runs):
        for key in ("results", "peers", "max_batch"):
            merged[key] += [{**row, "run": i} for row in r.get(key, [])]  # "run": its index in "runs"
    merged["config"]["methods"] = sorted({r["method"] for r in merged["results"]})
    merged["config"]["contexts"] = sorted({r["context"] for r in merged["results"] + merged["peers"]})
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(merged, indent=1, default=str))
    cuda = merged["env"]["device"].startswith("cuda")
    rows = sorted(merged["results"] + merged["peers"], key=lambda r: (r["method"], r["context"]))
    print(f"merged {len(paths)} runs: {merged['env'].get('gpu') or merged['env']['device']}, torch "
          f"{merged['env']['torch']}, triton {merged['env'].get('triton')}")
    if rows:
        print_table(rows, cuda)
    for r in merged["max_batch"]:
        if r.get("ok"):
            print(f"max batch {r['method']:<11} context {r['context']:>7}: batch {r['batch']:>5}, "
                  f"{r['tokens_per_s']:>10.1f} tok/s total")
    if plot_:
        plot(merged, out / "decode.png")
    print(f"[decode] wrote {out / 'results.json'}" + (f" and {out / 'decode.png'}" if plot_ else ""))
    return 0


# ---------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/decode.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama2-7b", help="zmzoo model name, path or .gguf (default llama2-7b)")
    p.add_argument("--weights", default="random", choices=["random", "pretrained"])
    p.add_argument("--tiny", action="store_true", help=f"the architecture of --model at tiny size {TINY} (CPU CI)")
    p.add_argument("--contexts", default="4096,16384,40960,54000", help="prompt lengths, comma-separated")
    p.add_argument("--methods", default="full,zeromerge,h2o,streaming")
    b = p.add_mutually_exclusive_group()
    b.add_argument("--kv-ratio", type=float, help="budget = floor(ratio * context) slots (default 0.05)")
    b.add_argument("--kv-budget", type=int, help="budget in slots at every context")
    p.add_argument("--cache-setting", action="append", default=[], metavar="KEY=VALUE",
                   help="extra cache setting for the compressed methods (e.g. tail=0.5); repeatable")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, help="timed steps per repeat (default 64 on CUDA, 8 on CPU; halved past 32K)")
    p.add_argument("--repeats", type=int, help="timed repeats, median reported (default 5 on CUDA, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps after the compiling call (>= 3)")
    p.add_argument("--device")
    p.add_argument("--dtype", help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--ops", default="auto", choices=["auto", "torch", "triton"],
                   help="auto: Triton on CUDA when its kernels work, else the torch references")
    p.add_argument("--gemv", default="auto", choices=["torch", "triton", "auto"],
                   help="the decode step's weight products (zmzoo.load's gemv): torch (cuBLAS, elementwise work in "
                        "inductor kernels beside), triton (zmzoo.ops.gemv with the norm / SiLU / residual add inside, "
                        "launch settings tuned on the device) or auto (zmzoo.load's default: per product the faster "
                        "of the two, as tuned)")
    p.add_argument("--compile", default="auto",
                   help="auto (the Generator's: inductor, CUDA graphs on CUDA), none (eager), or a backend name")
    p.add_argument("--layers", type=int, help="override the number of layers (e.g. 4: 7B widths, quick compiles)")
    p.add_argument("--no-share", action="store_true",
                   help="with --kv-budget, build one Generator per context for the compressed methods too")
    p.add_argument("--prefill-all-rows", action="store_true", help="prefill every batch row (default: copy row 0)")
    p.add_argument("--max-batch", action="store_true", help="find the largest batch per (method, context) instead")
    p.add_argument("--max-batch-limit", type=int, default=1024)
    p.add_argument("--max-batch-time", type=float, default=120.0, help="search seconds per (method, context)")
    p.add_argument("--max-batch-steps", type=int, default=16)
    p.add_argument("--max-batch-repeats", type=int, default=3)
    p.add_argument("--peers", default="hf", help="comma-separated peers: hf, or none")
    p.add_argument("--peer-contexts", help="contexts for the peers (default: all of --contexts)")
    p.add_argument("--hf-prefill-chunk", type=int, default=8192, help="HF prefill chunk (bounds its mask memory)")
    p.add_argument("--bandwidth-bytes", type=int, help="copy buffer for the bandwidth test (default 2 GiB CUDA, "
                                                        "256 MiB CPU)")
    p.add_argument("--time-limit", type=float, help="skip the configurations left after this many seconds")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/decode")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                   help="no run: merge results.json files of separate runs (e.g. bench/h200.sh's stages) into "
                        "OUT/results.json, print the table and plot")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failing configurations")
    return p


def _setting(kv: str) -> tuple[str, Any]:
    k, _, v = kv.partition("=")
    for conv in (int, float):
        try:
            return k, conv(v)
        except ValueError:
            pass
    return k, {"none": None, "true": True, "false": False}.get(v.lower(), v)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.merge:
        return merge(ns.merge, Path(ns.out), plot_=not ns.no_plot)
    import zmzoo
    from zmzoo.loading import default_device_dtype

    t_all = time.perf_counter()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    device, dtype = default_device_dtype(ns.device, ns.dtype)
    cuda = device.type == "cuda"
    ns.contexts = parse_list(ns.contexts, int)
    ns.methods = parse_list(ns.methods)
    ns.cache_settings = dict(_setting(s) for s in ns.cache_setting)
    if ns.kv_ratio is None and ns.kv_budget is None:
        ns.kv_ratio = 0.05
    if ns.warmup < 3:
        raise SystemExit("--warmup must be at least 3 (CUDA graph trees record on the second call)")
    steps_given, repeats_given = ns.steps is not None, ns.repeats is not None
    ns.steps = ns.steps or (64 if cuda else 8)
    ns.repeats = ns.repeats or (5 if cuda else 3)
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    if not cuda:
        print("[decode] running on CPU: timings use time.perf_counter and there are no CUDA graphs; this is a smoke "
              "test of the benchmark, not a measurement of the decode step")
    torch.manual_seed(ns.seed)

    # bandwidth
    bw = copy_bandwidth(device, ns.bandwidth_bytes or (2 * GiB if cuda else 256 * 2**20))
    ns.bandwidth = bw["bytes_per_s"]
    print(f"[decode] copy bandwidth: {bw['bytes_per_s'] / 1e9:.0f} GB/s (read + write, {bw['buffer_bytes'] / GiB:.2f} "
          f"GiB buffer, median of {bw['repeats']})")

    backend = probe_ops(ns, device, dtype)
    overrides: dict[str, Any] = dict(TINY) if ns.tiny else {}
    if ns.layers:
        overrides["n_layers"] = ns.layers
    need = max(ns.contexts) + 2 + ns.warmup + ns.steps * ns.repeats + 1
    if ns.weights == "random":  # positions past the trained window: irrelevant for speed, so silence the warning
        overrides["max_position_embeddings"] = need
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="max_seq_len .* exceeds")
        base = zmzoo.load(ns.model, weights=ns.weights, device=device, dtype=dtype, compile=False, max_seq_len=64,
                          ops=backend, gemv="torch", seed=ns.seed, args_overrides=overrides or None)
    base.model.set_gemv(ns.gemv, rows=(ns.batch,) if ns.batch <= 4 else ())
    gemv_tuning = gemv_report()
    args = base.args
    hw = environment().get("gpu", platform.processor() or "cpu")
    print(f"[decode] {args.name}: {args.n_layers} layers, dim {args.dim}, {args.n_heads}/{args.n_kv_heads} heads, "
          f"{str(dtype).replace('torch.', '')} on {device} ({hw}), "
          f"ops={backend}, gemv={ns.gemv}, compile={ns.compile}; loaded in {time.perf_counter() - t0:.1f}s; "
          f"weights read per step {weight_bytes(base.model) / GiB:.2f} GiB")
    budget_desc = f"kv_budget={ns.kv_budget}" if ns.kv_budget else f"kv_ratio={ns.kv_ratio} of the context"

    def plan(context: int) -> tuple[int, int]:
        steps, repeats = ns.steps, ns.repeats
        if context > 32768 and cuda:  # long contexts: fewer steps unless given
            steps = steps if steps_given else max(16, steps // 2)
            repeats = repeats if repeats_given else max(3, repeats - 2)
        return steps, repeats

    results: dict[str, Any] = {
        "env": {**environment(), "device": str(device), "dtype": str(dtype).replace("torch.", ""), "ops": backend,
                "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
                "timer": "cuda events" if cuda else "time.perf_counter (CPU)"},
        "config": {"model": args.name, "weights": ns.weights, "tiny": ns.tiny, "contexts": ns.contexts,
                   "methods": ns.methods, "budget": budget_desc, "kv_ratio": ns.kv_ratio, "kv_budget": ns.kv_budget,
                   "cache_settings": ns.cache_settings, "batch": ns.batch, "compile": ns.compile,
                   "gemv": ns.gemv, "warmup": ns.warmup, "seed": ns.seed,
                   "model_args": {k: getattr(args, k) for k in ("n_layers", "dim", "n_heads", "n_kv_heads",
                                                                 "head_dim", "intermediate_size", "vocab_size",
                                                                 "tie_embeddings")},
                   "roofline": "bytes/step = weights (tied embedding once, untied embedding table not counted) + "
                               "KV read (full: 2*L*Hkv*D*itemsize*tokens attended; compressed: over the budget "
                               "slots + fp32 w read + fp32 scores read and written, when used) x batch; "
                               "roofline tok/s = batch * copy bandwidth / bytes"},
        "bandwidth": bw,
        "gemv_tuning": gemv_tuning,
        "results": [],
        "peers": [],
        "max_batch": [],
    }

    def out_of_time() -> bool:
        return ns.time_limit is not None and time.perf_counter() - t_all > ns.time_limit

    def save() -> None:  # after every configuration, so that a run cut short still leaves its figures
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    if ns.max_batch:
        for method in ns.methods:
            for context in ns.contexts:
                if out_of_time():
                    results["max_batch"].append({"method": method, "context": context, "ok": False,
                                                 "error": f"skipped: --time-limit {ns.time_limit}s reached"})
                    continue
                print(f"[decode] max batch: {method} at {context} ...", flush=True)
                r = max_batch_search(base, ns, method, context)
                results["max_batch"].append(r)
                save()
                if r.get("ok"):
                    print(f"[decode]   batch {r['batch']} (probes {r['probes']}): {r['tokens_per_s']:.1f} tok/s "
                          f"total, decode peak {fmt_bytes(r.get('decode_peak_bytes'))} GiB")
                else:
                    print(f"[decode]   failed: {r.get('error')}")
    else:
        def report(r: dict[str, Any]) -> None:
            results["results"].append(r)
            save()
            if r["ok"]:
                print(f"[decode]   {r['method']} at {r['context']}: {r['tokens_per_s']:.1f} tok/s "
                      f"({r['pct_roofline']:.1f} % of roofline), prefill {r['prefill_s']:.2f}s, first call "
                      f"{r['compile_s']:.1f}s" + (f", {r['cudagraph_skips']} CUDA graph skip(s)!"
                                                  if r.get("cudagraph_skips") else ""), flush=True)
            else:
                print(f"[decode]   {r['method']} at {r['context']} failed: {r['error']}", flush=True)

        for method in ns.methods:
            shared = method != "full" and ns.kv_budget is not None and not ns.no_share
            groups = [ns.contexts] if shared else [[c] for c in ns.contexts]
            for group in groups:
                if out_of_time():
                    for c in group:
                        results["results"].append({"method": method, "context": c, "batch": ns.batch, "ok": False,
                                                   "error": f"skipped: --time-limit {ns.time_limit}s reached"})
                    continue
                plans = {c: plan(c) for c in group}
                print(f"[decode] {method} at context(s) {', '.join(map(str, group))} "
                      f"({'; '.join(f'{st} steps x {rp} repeats' for st, rp in plans.values())})"
                      + (" on one Generator (same cache shapes)" if len(group) > 1 else "") + " ...", flush=True)
                run_group(base, ns, method, group, ns.batch, plans, report)

    peers = [x for x in parse_list(ns.peers) if x != "none"]
    if peers and not ns.max_batch:
        del base
        free_memory(device)
        base = None
        peer_contexts = parse_list(ns.peer_contexts, int) if ns.peer_contexts else ns.contexts
        for peer in peers:
            if peer != "hf":
                print(f"[decode] peer {peer!r} unknown (known: hf): skipped")
                continue
            for context in peer_contexts:
                steps, repeats = plan(context)
                if out_of_time():
                    results["peers"].append({"peer": "hf-static", "method": "hf-static", "context": context,
                                             "ok": False, "error": f"skipped: --time-limit {ns.time_limit}s reached"})
                    continue
                print(f"[decode] peer hf-static at context {context} ...", flush=True)
                r = hf_peer(args, ns, device, dtype, context, steps, repeats)
                results["peers"].append(r)
                save()
                if r["ok"]:
                    print(f"[decode]   {r['tokens_per_s']:.1f} tok/s ({r['pct_roofline']:.1f} % of roofline), "
                          f"first call {r['compile_s']:.1f}s")
                else:
                    print(f"[decode]   peer skipped: {r['error']}")
                    if "ModuleNotFoundError" in r["error"] or "ImportError" in r["error"]:
                        break

    results["wall_s"] = time.perf_counter() - t_all
    results["env"]["max_rss_bytes"] = max_rss_bytes()
    print()
    print(f"zmzoo decode benchmark: {args.name} ({ns.weights}), {results['env']['device']} "
          f"{results['env'].get('gpu', '')}, {results['env']['dtype']}, ops={backend}, batch {ns.batch}, {budget_desc}")
    if results["results"] or results["peers"]:
        print_table(results["results"] + results["peers"], cuda)
    if results["max_batch"]:
        print("\nmax batch:")
        for r in results["max_batch"]:
            if r.get("ok"):
                print(f"  {r['method']:<11} context {r['context']:>7}: batch {r['batch']:>5}, "
                      f"{r['tokens_per_s']:>10.1f} tok/s total")
            else:
                print(f"  {r['method']:<11} context {r['context']:>7}: {r.get('error')}")
    print(f"\nwall time {results['wall_s']:.1f}s")
    save()
    if not ns.no_plot:
        plot(results, out / "decode.png")
    print(f"[decode] wrote {out / 'results.json'}" + ("" if ns.no_plot else f" and {out / 'decode.png'}"))
    # a run that measured only peers (--methods "") succeeded if they did
    ok = [r for r in results["results"] + results["max_batch"] + results["peers"] if r.get("ok")]
    return 0 if ok else 1


if __name__ == "__main__":
    import faulthandler
    import signal

    # a run stopped by a time limit (bench/h200.sh's `timeout` sends SIGTERM) prints every thread's Python stack first:
    # one `main` stage once stalled for minutes without output, and this says where the next one is
    faulthandler.register(signal.SIGTERM, chain=True)
    sys.exit(main())

"""Decode benchmark: tokens/s, memory and % of the memory-bandwidth roofline of zmzoo's compiled decode step.

    python -m bench.decode --model llama2-7b --weights random --contexts 4096,16384,40960,54000 \
        --methods full,zeromerge,h2o,streaming --kv-ratio 0.05 --batch 1 --out out/decode

(``python -m zmzoo bench ...`` runs the same from a source checkout.) The weights are loaded once with ``zmzoo.load``;
every (method, context) then gets its own Generator on those weights, ``gen.with_cache(method, kv_budget=...,
max_seq_len=context + new tokens, max_batch_size=batch)``, dropped with everything compiled for it before the next
(``bench.measure``). A random prompt of ``context`` tokens is prefilled (timed after one untimed prefill of the same
length, synchronized: scoring and compression included; HF's prefill is chunked and not warmed up), then the
Generator's compiled decode step (``torch.compile(fullgraph=True, mode="reduce-overhead")``: CUDA graphs) is warmed
up and timed over ``steps`` steps with CUDA events, ``repeats`` times; the median is reported. On CPU the same runs
with ``time.perf_counter`` and no CUDA graphs (a smoke test, not a measurement).

Kernels: ``--ops`` is ``zmzoo.load``'s (auto: Triton on CUDA, the torch references elsewhere). A configuration whose
kernels fail is a failed configuration, with the error in its row, and the run exits 1: nothing falls back to other
kernels. The JSON records the ops and GEMV backend each row ran (``ops``, ``gemv``) and what the GEMV tuning measured
(``gemv_tuning``, from ``gen.model.gemv_tuning``).

Budgets: ``--kv-ratio r`` keeps ``floor(r * context)`` slots (a fraction of the prompt, as the paper's throughput runs
do); ``--kv-budget n`` keeps ``n`` slots at every context.

Roofline: bytes one decode step must move = weights as stored (every parameter once, quantized weights as their
integers, scales and zeros: ``--quantize``; a tied embedding counted once as the output projection; an untied embedding
table not counted, since a step reads one row of it) + KV bytes
(full: ``2 * layers * kv_heads * head_dim * itemsize * tokens attended``; compressed: the same over the budget's slots,
plus the fp32 ``w`` array read when compensation is on and the fp32 scores read and written when decode scoring is
on), times the batch for the KV part. Roofline tokens/s = batch * copy bandwidth / bytes, the copy bandwidth measured at
start (``bench.timing.copy_bandwidth``: device-to-device copy, bytes read + written, median of repeats).

``--max-batch`` (``bench.maxbatch``): for each (method, context), the largest batch that fits (doubling then bisection
over batch sizes, each probe allocating the caches, prefilling a prompt and running one decode step; out-of-memory is
caught) and the total tokens/s of the compiled step at that batch. Rows are filled by prefilling row 0 and copying its
cache state to the other rows (every cache buffer is per row along dim 0; ``--prefill-all-rows`` prefills each row
instead).

Peers (``--peers hf,gptfast``, ``bench.peers``), after zmzoo's rows, at ``--peer-contexts``: ``hf`` is HF
transformers' LlamaForCausalLM with the same dimensions, random weights from the same seed, a ``StaticCache`` and
``torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)``. ``gptfast`` is gpt-fast's Transformer with
the same dimensions and random weights, weight-only int8 / int4 (group ``--group-size``, default 64) by its own quant
handlers when ``--quantize`` is int8 / int4 (its full precision otherwise: bf16 on CUDA), its prefill (chunks of
``--gptfast-prefill-chunk``) and its ``decode_one_token`` (sampling included) compiled as its generate.py does, with
``mode="reduce-overhead", fullgraph=True`` (``--compile auto`` on CUDA; eager on CPU). gpt-fast's code is not in
this repository: ``scripts/fetch_peers.sh`` puts it in the ignored ``.peers/gpt-fast`` (carry that folder to a machine
without network). gpt-fast's int4 runs on CUDA only (its kernels have no CPU version). A peer that cannot run
(transformers missing, no .peers/gpt-fast, another architecture) is skipped with the reason printed and in its row.

Writes ``OUT/results.json`` (every figure and the environment; rewritten after every configuration, so a run cut
short keeps what it measured) and ``OUT/decode.png``; prints a table. ``--merge`` joins the results.json of separate
runs (old and new files alike) into one.

Wall time on the H200 (torch 2.11, Triton ops): compiling the 32-layer LLaMA-2-7B decode step takes 50-70 s per cache
shape and dominates; the timed steps take seconds. With ``--kv-budget`` a compressed method has the same cache shapes
at every context, so it runs all contexts on one Generator (one compile; ``--no-share`` to turn that off); with
``--kv-ratio`` every (method, context) compiles. The issue's setting with ``--kv-budget 2048`` compiles 7 times
(about 7-8 minutes), with ``--kv-ratio 0.05`` 16 times; ``--layers 4`` keeps 7B widths at a fraction of the compile
time, ``--time-limit`` bounds a run. Pipe through ``tee`` (and ``PYTHONUNBUFFERED=1``) to keep the log; a run stopped
by SIGTERM prints every thread's Python stack first.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import platform
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

try:
    from bench.maxbatch import max_batch_search
    from bench.measure import compile_arg, run_group, weight_bytes
    from bench.peers import gptfast_label, gptfast_peer, hf_peer
    from bench.plots import decode_plot
    from bench.timing import GiB, copy_bandwidth, free_memory, max_rss_bytes, run_env
except ModuleNotFoundError as e:  # `python bench/decode.py` puts bench/, not the checkout's root, on the path
    if e.name != "bench":
        raise
    raise SystemExit("bench/decode.py is a module of the bench package: run `python -m bench.decode ...` from the "
                     "repository's root (or `python -m zmzoo bench ...`)") from None
from zmzoo.cli import parse_setting
from zmzoo.environment import environment

PROG = "python -m bench.decode"
# the tiny config of --tiny (CPU smoke tests): the architecture of --model with these dimensions
TINY = {"n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 96, "vocab_size": 128}


def parse_list(s: str, typ=str) -> list:
    return [typ(x) for x in s.split(",") if x.strip()]


def gemv_report(tuning: dict, show: bool = True) -> list[dict[str, Any]]:
    """What ``zmzoo.ops.gemv.tune`` measured on the model (``model.gemv_tuning``; empty unless --gemv triton/auto
    on CUDA): per (rows, N, K, fusion) the setting chosen and the microseconds of the compiled torch composition
    (F.linear and its fused elementwise kernel) and of the kernel's best setting."""
    from zmzoo.ops.gemv import Split

    rows = []
    for (m, n, k, dtype, _, fusion), rec in tuning.items():
        best, times, choice = rec.best, rec.times, rec.auto
        if choice is None:
            choice_s = "torch"
        elif isinstance(choice, Split):
            pro = "silu" if fusion.silu else "norm"
            choice_s = f"{pro} by torch + triton {tuple(choice.config)} ({times[choice] * 1e6:.1f} us)"
        else:
            choice_s = "triton " + repr(tuple(choice))
        row = {"rows": m, "n": n, "k": k, "dtype": str(dtype).replace("torch.", ""), "fusion": str(fusion),
               "choice": choice_s, "torch_us": times["torch"] * 1e6, "triton_us": times[best] * 1e6,
               "triton_setting": tuple(best)}
        rows.append(row)
        if show:
            print(f"[gemv] rows={m} {n} x {k} {fusion}: torch {row['torch_us']:.1f} us, kernel {row['triton_us']:.1f} "
                  f"us at (BLOCK_N, BLOCK_K, warps, stages, split, fuse)={row['triton_setting']} -> {row['choice']}")
    return rows


def failed_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that failed for a reason other than out-of-memory or the time limit: a broken kernel, a bad setting."""
    return [r for r in rows if not r.get("ok") and not r.get("oom")
            and not str(r.get("error", "")).startswith("skipped")]


# ---------------------------------------------------------------------------------------------------- output
def fmt_bytes(b: int | None, unit: int = GiB) -> str:
    return "-" if b is None else f"{b / unit:.2f}"


def print_table(rows: list[dict[str, Any]], cuda: bool) -> None:
    mem = "GiB" if cuda else "(n/a on CPU)"
    head = (f"{'method':<17} {'context':>7} {'batch':>5} {'slots':>6} {'prefill s':>9} {'pre peak':>8} "
            f"{'tok/s':>9} {'dec peak':>8} {'cache MiB':>9} {'MB/step':>8} {'roof tok/s':>10} {'% roof':>6} "
            f"{'compile s':>9} {'wt MB':>7}")
    print(f"peak memory columns in {mem}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if not r.get("ok"):
            what = "" if str(r.get("error", "")).startswith("skipped") else "FAILED: "
            print(f"{r['method']:<17} {r['context']:>7} {r.get('batch', '-'):>5}  {what}{r.get('error')}")
            continue
        slots = r.get("budget_slots") or "all"
        cache_mib = f"{r['cache_bytes'] / 2**20:.1f}" if r.get("cache_bytes") is not None else "-"
        print(f"{r['method']:<17} {r['context']:>7} {r['batch']:>5} {slots!s:>6} {r['prefill_s']:>9.3f} "
              f"{fmt_bytes(r.get('prefill_peak_bytes')):>8} {r['tokens_per_s']:>9.1f} "
              f"{fmt_bytes(r.get('decode_peak_bytes')):>8} {cache_mib:>9} {r['bytes_per_step'] / 1e6:>8.1f} "
              f"{r['roofline_tokens_per_s']:>10.1f} {r['pct_roofline']:>6.1f} {r['compile_s']:>9.1f} "
              f"{r.get('weight_bytes', 0) / 1e6:>7.1f}")



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
        decode_plot(merged, out / "decode.png")
    print(f"[decode] wrote {out / 'results.json'}" + (f" and {out / 'decode.png'}" if plot_ else ""))
    return 0



# ---------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
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
                   help="zmzoo.load's ops: auto = Triton on CUDA, the torch references elsewhere (a kernel that fails "
                        "fails its configuration: no fallback)")
    p.add_argument("--gemv", default="auto", choices=["torch", "triton", "auto"],
                   help="the decode step's weight products (zmzoo.load's gemv): torch (cuBLAS, elementwise work in "
                        "inductor kernels beside), triton (zmzoo.ops.gemv with the norm / SiLU / residual add inside, "
                        "launch settings tuned on the device) or auto (zmzoo.load's default: per product the faster "
                        "of the two, as tuned)")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4", "gguf"],
                   help="zmzoo.load's quantize: auto (a GGUF keeps its quantization on CUDA, else full precision), "
                        "none, int8 (per output channel), int4 (per --group-size columns), gguf")
    p.add_argument("--group-size", type=int, help="int4 columns per scale: 32, 64 (default) or 128")
    p.add_argument("--act-quant", default="none", choices=["none", "int8"],
                   help="zmzoo.load's act_quant: int8 quantizes the quantized products' activations (W8A8 / W4A8)")
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
    p.add_argument("--peers", default="hf",
                   help="comma-separated peers: hf (transformers, static cache), gptfast (gpt-fast from "
                        ".peers/gpt-fast, see scripts/fetch_peers.sh; int8 / int4 with --quantize int8 / int4, "
                        "else full precision), or none")
    p.add_argument("--peer-contexts", help="contexts for the peers (default: all of --contexts)")
    p.add_argument("--hf-prefill-chunk", type=int, default=8192, help="HF prefill chunk (bounds its mask memory)")
    p.add_argument("--gptfast-prefill-chunk", type=int, default=1024,
                   help="gpt-fast prefill chunk (its uncompiled prefill materializes each chunk's scores)")
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
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
    # under torchrun (tensor parallel, zmzoo.parallel): every rank runs the same steps, rank 0 prints and writes
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if cuda and "WORLD_SIZE" in os.environ and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if rank:
        sys.stdout = open(os.devnull, "w")  # for the process's life
    ns.contexts = parse_list(ns.contexts, int)
    ns.methods = parse_list(ns.methods)
    ns.cache_settings = dict(parse_setting(s) for s in ns.cache_setting)
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

    bw = copy_bandwidth(device, ns.bandwidth_bytes or (2 * GiB if cuda else 256 * 2**20))
    ns.bandwidth = bw["bytes_per_s"]
    print(f"[decode] copy bandwidth: {bw['bytes_per_s'] / 1e9:.0f} GB/s (read + write, {bw['buffer_bytes'] / GiB:.2f} "
          f"GiB buffer, median of {bw['repeats']})")

    overrides: dict[str, Any] = dict(TINY) if ns.tiny else {}
    if ns.layers:
        overrides["n_layers"] = ns.layers
    need = max(ns.contexts, default=0) + 2 + ns.warmup + ns.steps * ns.repeats + 1
    if ns.weights == "random":  # positions past the trained window: irrelevant for speed, so silence the warning
        overrides["max_position_embeddings"] = need
    t0 = time.perf_counter()
    # the loaded Generator only holds the weights (and a 64-position full cache): every configuration gets its own
    # through with_cache. Its GEMV tuning (gemv triton/auto on CUDA) is for --batch rows.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="max_seq_len .* exceeds")
        base = zmzoo.load(ns.model, weights=ns.weights, device=device, dtype=dtype, compile=compile_arg(ns),
                          max_seq_len=64, max_batch_size=ns.batch, ops=ns.ops, gemv=ns.gemv, seed=ns.seed,
                          quantize=None if ns.quantize == "none" else ns.quantize, group_size=ns.group_size,
                          act_quant=None if ns.act_quant == "none" else ns.act_quant, args_overrides=overrides or None)
    wn = base.model.weight_nbytes()
    backend = base.backend
    gemv_report(base.model.gemv_tuning)
    args = base.args
    hw = environment().get("gpu", platform.processor() or "cpu")
    print(f"[decode] {args.name}: {args.n_layers} layers, dim {args.dim}, {args.n_heads}/{args.n_kv_heads} heads, "
          f"{str(dtype).replace('torch.', '')} on {device} ({hw}), "
          f"ops={backend}, gemv={base.gemv} (asked {ns.gemv}), compile={ns.compile}; loaded in "
          f"{time.perf_counter() - t0:.1f}s; weights {wn['weight_bytes'] / GiB:.2f} GiB in memory, "
          f"{weight_bytes(base.model) / GiB:.2f} GiB read per step ({base.model.quantization or 'not quantized'})"
          + (f"; tensor parallel over {base.model.tp.world} rank(s), memory and roofline per rank"
             if base.model.tp is not None else ""))
    budget_desc = f"kv_budget={ns.kv_budget}" if ns.kv_budget else f"kv_ratio={ns.kv_ratio} of the context"

    def plan(context: int) -> tuple[int, int]:
        steps, repeats = ns.steps, ns.repeats
        if context > 32768 and cuda:  # long contexts: fewer steps unless given
            steps = steps if steps_given else max(16, steps // 2)
            repeats = repeats if repeats_given else max(3, repeats - 2)
        return steps, repeats

    results: dict[str, Any] = {
        "env": run_env(device=device, dtype=dtype, ops=backend, prog=PROG, argv=argv,
                       timer="cuda events" if cuda else "time.perf_counter (CPU)"),
        "config": {"model": args.name, "weights": ns.weights, "tiny": ns.tiny, "contexts": ns.contexts,
                   "methods": ns.methods, "budget": budget_desc, "kv_ratio": ns.kv_ratio, "kv_budget": ns.kv_budget,
                   "cache_settings": ns.cache_settings, "batch": ns.batch, "compile": ns.compile,
                   "tensor_parallel": base.model.tp.world if base.model.tp is not None else 1,
                   "gemv": ns.gemv, "gemv_ran": base.gemv, "ops": ns.ops, "warmup": ns.warmup, "seed": ns.seed,
                   "quantize": ns.quantize, "group_size": ns.group_size, "act_quant": ns.act_quant,
                   "quantization": base.model.quantization,
                   "weight_bytes_in_memory": wn["weight_bytes"], "weight_bytes_per_step": wn["weight_bytes_per_step"],
                   "model_args": {k: getattr(args, k) for k in ("n_layers", "dim", "n_heads", "n_kv_heads",
                                                                 "head_dim", "intermediate_size", "vocab_size",
                                                                 "tie_embeddings")},
                   "roofline": "bytes/step = weights as stored (quantized: integers + scales + zeros; tied embedding "
                               "once, untied embedding table not counted) + "
                               "KV read (full: 2*L*Hkv*D*itemsize*tokens attended; compressed: over the budget "
                               "slots + fp32 w read + fp32 scores read and written, when used) x batch; "
                               "roofline tok/s = batch * copy bandwidth / bytes"},
        "bandwidth": bw,
        "gemv_tuning": [],
        "results": [],
        "peers": [],
        "max_batch": [],
    }

    def out_of_time() -> bool:
        return ns.time_limit is not None and time.perf_counter() - t_all > ns.time_limit

    def save() -> None:  # after every configuration, so that a run cut short still leaves its figures
        if rank:
            return
        if base is not None:
            results["gemv_tuning"] = gemv_report(base.model.gemv_tuning, show=False)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    save()
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
    if peers and world > 1:
        print(f"[decode] peers ({', '.join(peers)}) run in one process: skipped under torchrun's {world} ranks")
        peers = []
    if peers and not ns.max_batch:
        save()
        base = None  # the peers build their own models: zmzoo's weights go first
        free_memory(device)
        peer_contexts = parse_list(ns.peer_contexts, int) if ns.peer_contexts else ns.contexts
        gf_quantize = ns.quantize if ns.quantize in ("int8", "int4") else None
        gf_group = ns.group_size or 64  # zmzoo's int4 default
        for peer in peers:
            if peer not in ("hf", "gptfast"):
                print(f"[decode] peer {peer!r} unknown (known: hf, gptfast): skipped")
                continue
            name = "hf-static" if peer == "hf" else gptfast_label(dtype, gf_quantize, gf_group)
            for context in peer_contexts:
                steps, repeats = plan(context)
                if out_of_time():
                    results["peers"].append({"peer": name, "method": name, "context": context,
                                             "ok": False, "error": f"skipped: --time-limit {ns.time_limit}s reached"})
                    continue
                print(f"[decode] peer {name} at context {context} ...", flush=True)
                if peer == "hf":
                    r = hf_peer(args, ns, device, dtype, context, steps, repeats)
                else:
                    r = gptfast_peer(args, ns, device, dtype, context, steps, repeats, quantize=gf_quantize,
                                     groupsize=gf_group)
                results["peers"].append(r)
                save()
                if r["ok"]:
                    print(f"[decode]   {r['tokens_per_s']:.1f} tok/s ({r['pct_roofline']:.1f} % of roofline), "
                          f"first call {r['compile_s']:.1f}s")
                else:
                    print(f"[decode]   peer skipped: {r['error']}")
                    if any(k in r["error"] for k in ("ModuleNotFoundError", "ImportError", "FileNotFoundError")):
                        break

    results["wall_s"] = time.perf_counter() - t_all
    results["env"]["max_rss_bytes"] = max_rss_bytes()
    print()
    print(f"zmzoo decode benchmark: {args.name} ({ns.weights}), {results['env']['device']} "
          f"{results['env'].get('gpu', '')}, {results['env']['dtype']}, ops={backend}, batch {ns.batch}, "
          f"{budget_desc}, weights {results['config']['quantization'] or 'not quantized'}")
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
        decode_plot(results, out / "decode.png")
    print(f"[decode] wrote {out / 'results.json'}" + ("" if ns.no_plot else f" and {out / 'decode.png'}"))
    failed = failed_rows(results["results"] + results["max_batch"])
    if failed:
        print(f"[decode] {len(failed)} configuration(s) failed (not for memory): "
              + "; ".join(f"{r['method']} at {r['context']}: {r['error']}" for r in failed))
        return 1
    # a run that measured only peers (--methods "") succeeded if they did
    ok = [r for r in results["results"] + results["max_batch"] + results["peers"] if r.get("ok")]
    return 0 if ok else 1


def cli(argv: list[str] | None = None) -> int:
    """The command line (``python -m bench.decode``, ``python -m zmzoo bench``): ``main``, and a run stopped by a time
    limit (bench/h200.sh's ``timeout`` sends SIGTERM) prints every thread's Python stack first: one ``main`` stage
    once stalled for minutes without output, and this says where the next one is."""
    faulthandler.register(signal.SIGTERM, file=sys.__stderr__, chain=True)
    return main(argv)


if __name__ == "__main__":
    sys.exit(cli())

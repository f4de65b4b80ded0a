"""Where the lookahead's prefill time goes: ``Generator.prefill`` with the ``retrieval`` preset against plain ZeroMerge
on the same weights, each timed (median of repeats, after a warm-up that compiles the decode step and, on a
compiling Generator, the rescore), then one profiled prefill of the preset with the named ranges
``Transformer.finish_prefill`` marks (``zmzoo.draft``, ``zmzoo.prompt_lookup``, ``zmzoo.rescore``), what the rescore
dispatched per layer (ATen ops, kernel launches, compiled-graph calls: ``bench.probes.rescore_ops``' counts) and the
ops that take the most time.

    python -m bench.probes.lookahead_phases --model llama2-7b --contexts 4096,40960 --kv-budget 2048 --out OUT

Writes OUT/lookahead_phases.json (with ``--out``) and prints a table per context.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
from torch.profiler import ProfilerActivity, profile

import zmzoo
from bench.probes.rescore_ops import count_range
from zmzoo.models.transformer import rescore_layer


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> list[float]:
    ts = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return ts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probes.lookahead_phases", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--weights", default="random")
    p.add_argument("--contexts", default="4096,40960")
    p.add_argument("--kv-budget", type=int, default=2048)
    p.add_argument("--preset", default="retrieval")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", default="auto", choices=["auto", "true", "false"],
                   help="zmzoo.load's compile (auto: on CUDA, the decode step and the rescore compiled)")
    p.add_argument("--out", default=None, help="folder for lookahead_phases.json (default: print only)")
    ns = p.parse_args(argv)
    contexts = [int(c) for c in ns.contexts.split(",")]
    out = Path(ns.out) if ns.out else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    # compile "auto": on CUDA the generators below compile their decode step (CUDA graph), through which the
    # preset's draft runs, as it does for a user (compile=False here would time an eager draft)
    compile = {"auto": "auto", "true": True, "false": False}[ns.compile]
    base = zmzoo.load(ns.model, weights=ns.weights, method="full", max_seq_len=64, compile=compile)
    vocab = base.model.args.vocab_size
    gens = {name: base.with_cache("zeromerge", kv_budget=ns.kv_budget, preset=preset, max_seq_len=max(contexts) + 64)
            for name, preset in (("plain", None), (ns.preset, ns.preset))}
    g = torch.Generator().manual_seed(0)
    given = sys.argv[1:] if argv is None else argv
    la = gens[ns.preset]
    rescore = ("eager" if la.compile is False or la.compile is None else "compiled (inductor)" if la.compile is True
               else f"compiled (backend {la.compile!r})")
    print(f"{ns.preset}: the rescore runs {rescore} (the Generator's compile setting)", flush=True)
    report: dict = dict(command=" ".join(["python -m bench.probes.lookahead_phases", *given]),
                        device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", rescore=rescore,
                        contexts={})

    def write() -> None:
        if out is not None:
            (out / "lookahead_phases.json").write_text(json.dumps(report, indent=1))

    for ctx in contexts:
        ids = torch.randint(3, vocab, (ctx,), generator=g).tolist()
        row: dict = {}
        for name, gen in gens.items():
            gen.generate(ids[:256], max_new_tokens=2)  # compiles the decode step once (CUDA graph)
            gen.prefill([ids])  # and the preset's rescore (the first compressed prompt), where the Generator compiles
            row[f"{name}_prefill_s"] = statistics.median(timed(lambda gen=gen: gen.prefill([ids]), ns.repeats))
        gen = gens[ns.preset]
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                                         else [])) as prof:
            gen.prefill([ids])
            sync()
        ranges = {}
        for e in prof.key_averages():
            if e.key.startswith("zmzoo."):
                ranges[e.key] = dict(cpu_ms=e.cpu_time_total / 1e3, device_ms=getattr(e, "device_time_total", 0) / 1e3,
                                     count=e.count)
        row["ranges"] = ranges
        n_layers = gen.args.n_layers
        c = count_range(prof, "zmzoo.rescore")
        row["rescore_per_layer"] = {k: c[k] / n_layers for k in ("aten", "launches", "graphs")}
        row["rescore_ops"] = c["ops"]
        # graphs the compiled rescore holds so far (all contexts up to this one): 1 unless something recompiled it
        row["rescore_graphs"] = len(_debug_get_cache_entry_list(rescore_layer.__code__))
        report["contexts"][ctx] = row
        print(f"\ncontext {ctx}: plain prefill {row['plain_prefill_s']:.3f} s, {ns.preset} "
              f"{row[ns.preset + '_prefill_s']:.3f} s", flush=True)
        for k, v in ranges.items():
            print(f"  {k:<22} cpu {v['cpu_ms']:8.1f} ms  device {v['device_ms']:8.1f} ms  x{v['count']}", flush=True)
        pl = row["rescore_per_layer"]
        print(f"  rescore, {rescore}, per layer: {pl['aten']:.1f} ATen ops, {pl['launches']:.1f} kernel launches, "
              f"{pl['graphs']:.0f} compiled-graph calls; {row['rescore_graphs']} rescore graph(s) compiled so far",
              flush=True)
        write()
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        row["top_ops"] = prof.key_averages().table(sort_by=key, row_limit=25)
        print(row["top_ops"], flush=True)
        write()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

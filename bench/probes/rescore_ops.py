"""Host work of the lookahead's rescore: the ops one prefill's ``zmzoo.rescore`` range dispatches per layer, eager
against compiled (the Generator's compile setting), on a tiny random model by default.

    python -m bench.probes.rescore_ops --context 1200 --kv-budget 64 --layers 4

For each mode it builds a ``preset="retrieval"`` Generator, runs one prefill (which compiles what compile covers),
then profiles one more and counts, inside the ``zmzoo.rescore`` range (``Transformer.finish_prefill``), per layer:

- ``aten``: ATen ops dispatched from Python or from a compiled graph's wrapper (an op inside another ATen op, such as
  the copy inside ``aten::to``, is not counted again): what the host pays ~10-30 µs each for on a GPU machine;
- ``kernels``: on CUDA, kernel launches (runtime launch calls); on the CPU, the fused kernels inductor generated for
  the rescore's graph (each called once per layer), counted while it compiled them (0 when eager; the ATen ops the
  graph calls, its matrix products, attention and sorts, are among ``aten``);
- ``graphs``: calls into compiled regions;
- the range's host time (ms, for the whole prefill's rescore).

Writes OUT/rescore_ops.json with ``--out``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import zmzoo

TINY = {"dim": 64, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 96, "vocab_size": 128}
_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")


def count_range(prof, name: str) -> dict:
    """ATen ops (outermost only), kernel launches and compiled-region calls inside the profiled range ``name``."""
    events = prof.events()
    ranges = [e for e in events if e.name == name]
    if not ranges:
        return {"aten": 0, "launches": 0, "graphs": 0, "host_ms": 0.0, "ops": {}}
    spans = [(e.time_range.start, e.time_range.end) for e in ranges]

    def inside(e) -> bool:
        return any(a <= e.time_range.start and e.time_range.end <= b for a, b in spans)

    def outermost_aten(e) -> bool:
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::"):
                return False
            p = p.cpu_parent
        return True

    ops: dict[str, int] = {}
    launches = graphs = 0
    for e in events:
        if not inside(e) or e.device_type != torch.autograd.DeviceType.CPU:
            continue
        if e.name.startswith("aten::") and outermost_aten(e):
            ops[e.name] = ops.get(e.name, 0) + 1
        elif e.name in _LAUNCHES:
            launches += 1
        elif e.name.startswith("Torch-Compiled Region"):
            graphs += 1
    return {"aten": sum(ops.values()), "launches": launches, "graphs": graphs,
            "host_ms": sum(b - a for a, b in spans) / 1e3, "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]))}


def measure(ns, compile: bool) -> dict:
    from torch._inductor.utils import run_and_get_code

    overrides = {"n_layers": ns.layers, "max_position_embeddings": ns.context + 64}
    if not ns.full_size:
        overrides.update(TINY)
    torch._dynamo.reset()
    gen = zmzoo.load(ns.model, weights="random", args_overrides=overrides, device=ns.device, dtype=torch.float32
                     if ns.device == "cpu" else torch.bfloat16, compile=compile, method="zeromerge",
                     kv_budget=ns.kv_budget, preset="retrieval", max_seq_len=ns.context + 64, verbose=False)
    vocab = gen.args.vocab_size
    ids = torch.randint(3, vocab, (ns.context,), generator=torch.Generator().manual_seed(0)).tolist()
    gen.generate(ids[: ns.kv_budget // 2], max_new_tokens=2)  # a prompt that fits: compiles the decode step alone
    _, codes = run_and_get_code(gen.prefill, [ids])  # compiles the rescore where compile covers it
    # the generated kernels its graph's wrapper calls (C++ on the CPU, Triton on CUDA), once each per layer
    # (the rescore's graph: the one that sorts through zmzoo::stable_argsort_desc; run_and_get_code may show the
    # decode step's too)
    kernels = sum(len(re.findall(r"^\s+(?:cpp_fused_\w+|triton_\w+\.run)\(", c, re.M)) for c in codes
                  if "stable_argsort_desc" in c)
    gen.prefill([ids])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ns.device == "cuda" else [])
    with profile(activities=acts) as prof:
        gen.prefill([ids])
        if ns.device == "cuda":
            torch.cuda.synchronize()
    c = count_range(prof, "zmzoo.rescore")
    n = gen.args.n_layers
    per_layer = {"aten": c["aten"] / n, "graphs": c["graphs"] / n,
                 "kernels": c["launches"] / n if ns.device == "cuda" else float(kernels if compile else 0)}
    return {"compile": compile, "layers": n, "per_layer": per_layer, "rescore_host_ms": c["host_ms"],
            "ops": c["ops"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probes.rescore_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--full-size", action="store_true", help="the model's own widths (default: tiny ones)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--context", type=int, default=1200)
    p.add_argument("--kv-budget", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--out", type=Path, default=None)
    ns = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    report = {"command": " ".join(["python -m bench.probes.rescore_ops", *given]), "device": ns.device, "modes": {}}
    for mode in ns.modes.split(","):
        r = measure(ns, compile=mode == "compiled")
        report["modes"][mode] = r
        pl = r["per_layer"]
        top = ", ".join(f"{k.removeprefix('aten::')} {v / r['layers']:g}" for k, v in list(r["ops"].items())[:8])
        print(f"{mode:>8}: per layer {pl['aten']:.1f} ATen ops, {pl['kernels']:.0f} kernels, {pl['graphs']:.0f} "
              f"compiled calls; rescore {r['rescore_host_ms']:.1f} ms on the host ({r['layers']} layers)\n"
              f"          most dispatched per layer: {top}", flush=True)
    if ns.out is not None:
        ns.out.mkdir(parents=True, exist_ok=True)
        (ns.out / "rescore_ops.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

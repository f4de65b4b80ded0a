"""Where the decode step's time goes: a kernel-by-kernel profile of the compiled step (no CUDA graphs, so every
kernel shows), beside the CUDA-graph step time of the same configuration.

    python -m bench.probes.profile_decode --method full --context 16384 --layers 2 --out OUT

Per-layer kernels are the same at any depth, so a few layers of the real widths compile in seconds. Prints the
profiler's table (CUDA time per kernel, summed over ``--steps`` steps, divided per step) and writes it with a Chrome
trace to OUT; set ``TORCH_LOGS=output_code TORCH_LOGS_OUT=OUT/code.txt`` to keep inductor's generated code as well.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import zmzoo


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.profile_decode", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--method", default="full")
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--kv-budget", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--ops", default="triton")
    p.add_argument("--gemv", default="auto", choices=["torch", "triton", "auto"],
                   help="the decode step's weight products (zmzoo.load's gemv)")
    p.add_argument("--out", type=Path, default=Path("out/profile"))
    ns = p.parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    kw = {} if ns.method == "full" else {"kv_budget": ns.kv_budget}
    max_seq_len = ns.context + 4 * ns.steps + 64
    gen = zmzoo.load(ns.model, weights="random", device=dev, dtype=torch.bfloat16, compile=True, method=ns.method,
                     max_seq_len=max_seq_len, ops=ns.ops, gemv=ns.gemv, args_overrides={"n_layers": ns.layers,
                                                                          "max_position_embeddings": max_seq_len},
                     **kw)
    step_plain = torch.compile(gen.model.decode, fullgraph=True, dynamic=False)  # same graph, no CUDA graphs
    ids = torch.randint(0, gen.args.vocab_size, (1, ns.context), device=dev)

    def run(fn, n):
        nonlocal tok
        for _ in range(n):
            tok = fn(tok, gen.pos).argmax(-1)
            gen.pos += 1

    def start(fn, warmup):  # prefill the prompt into row 0, then warm-up steps
        nonlocal tok
        gen.pos.zero_()
        tok = gen.model.prefill(ids, row=0).argmax(-1)
        gen.pos[0] = ns.context
        run(fn, warmup)
        torch.cuda.synchronize()

    tok = None
    results = {}
    for name, fn in (("cudagraph", gen.decode_step), ("plain", step_plain)):
        with torch.inference_mode():
            start(fn, 5)
            times = []
            for _ in range(5):
                t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0.record()
                run(fn, ns.steps)
                t1.record()
                t1.synchronize()
                times.append(t0.elapsed_time(t1) / ns.steps)
        results[name] = statistics.median(times)
        print(f"{name}: {results[name] * 1e3:.1f} us/step (median of 5 x {ns.steps} steps)", flush=True)

    with torch.inference_mode():
        start(step_plain, 3)
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            run(step_plain, ns.steps)
            torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=90)
    head = (f"{ns.model} {ns.layers} layers, {ns.method} at context {ns.context}, ops={ns.ops}, gemv={ns.gemv}: "
            f"CUDA-graph step "
            f"{results['cudagraph'] * 1e3:.1f} us, plain compiled step {results['plain'] * 1e3:.1f} us; "
            f"table over {ns.steps} steps")
    print(head)
    print(table)
    (ns.out / f"profile_{ns.method}_{ns.gemv}.txt").write_text(head + "\n" + table)
    prof.export_chrome_trace(str(ns.out / f"trace_{ns.method}_{ns.gemv}.json"))

    # the CUDA-graph step as the GPU runs it: kernels back to back, the gaps between them included
    with torch.inference_mode():
        start(gen.decode_step, 3)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(gen.decode_step, ns.steps)
            torch.cuda.synchronize()
    trace = ns.out / f"trace_{ns.method}_{ns.gemv}_cudagraph.json"
    prof.export_chrome_trace(str(trace))
    summary = timeline(json.loads(trace.read_text()), ns.steps)
    print(summary)
    (ns.out / f"timeline_{ns.method}_{ns.gemv}.txt").write_text(head + "\n" + summary)


def category(name: str) -> str:
    for key, cat in (("nvjet", "GEMM (cuBLAS)"), ("gemm", "GEMM (cuBLAS)"), ("splitKreduce", "GEMM split-K reduce"),
                     ("_gemv", "GEMV (Triton)"), ("_decode_attn_split", "attention split"),
                     ("_decode_attn_reduce", "attention reduce"), ("_slot_insert", "slot insert"),
                     ("triton_red", "inductor reduction"), ("triton_poi", "inductor pointwise"),
                     ("triton_per", "inductor reduction"), ("reduce_kernel", "aten reduction"),
                     ("elementwise", "aten elementwise")):
        if key in name:
            return cat
    return "other"


def timeline(trace: dict, steps: int) -> str:
    """Kernels of the traced steps in time order: per step, the busy time of each category and the idle time
    between kernels (launch latency, tails, dependencies), from the profiler's Chrome trace."""
    ks = sorted((e for e in trace["traceEvents"] if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    if not ks:
        return "timeline: the profiler recorded no kernels inside the CUDA graph"
    busy: dict[str, float] = {}
    count: dict[str, int] = {}
    idle, idle_n, end = 0.0, 0, None
    for e in ks:
        c = category(e["name"])
        busy[c] = busy.get(c, 0.0) + e["dur"]
        count[c] = count.get(c, 0) + 1
        if end is not None and e["ts"] > end:
            idle += e["ts"] - end
            idle_n += 1
        end = max(end or 0.0, e["ts"] + e["dur"])
    span = end - ks[0]["ts"]
    lines = [f"timeline of {steps} CUDA-graph steps: {len(ks) / steps:.0f} kernels/step, span "
             f"{span / steps:.1f} us/step, busy {sum(busy.values()) / steps:.1f} us, idle between kernels "
             f"{idle / steps:.1f} us/step ({idle / max(idle_n, 1):.2f} us per gap)"]
    for c, t in sorted(busy.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {c:<22} {count[c] / steps:6.1f} kernels/step {t / steps:9.1f} us/step "
                     f"{t / count[c]:7.2f} us each")
    names: dict[str, list[float]] = {}
    for e in ks:
        names.setdefault(e["name"][:100], []).append(e["dur"])
    lines.append("  per kernel name (calls/step, mean us):")
    for n, ds in sorted(names.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"    {len(ds) / steps:5.1f} x {sum(ds) / len(ds):7.2f} us  {n}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

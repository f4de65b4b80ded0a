"""Where the prefill's time goes: the prompt's attention under each SDPA backend, and a kernel-by-kernel profile of
one prefill of a few layers at real widths.

    python -m bench.probes.profile_prefill --method zeromerge --context 40960 --layers 2 --out OUT

Part 1 times causal attention of one layer's q, k, v (1, H, T, D) with every backend PyTorch offers (the default
choice, flash, cuDNN, memory-efficient, and the flash/cuDNN ops that also return the log-sum-exp that prompt scoring
needs), and checks that the log-sum-exps agree. Part 2 profiles ``model.prefill`` (CUDA time per op, summed over the
layers, median prefill time beside it). Per-layer work is the same at any depth, so two layers show the shares.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

import zmzoo
from zmzoo.models.transformer import PrefillKernels


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int = 5) -> float:
    fn()
    sync()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def attention_backends(t: int, h: int, d: int, dtype: torch.dtype) -> list[str]:
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, t, d, dtype=dtype, device="cuda", generator=g) for _ in range(3))
    scale = d**-0.5
    flops = 2 * 2 * h * d * t * t / 2  # QK^T and PV, causal half
    lines = [f"causal attention, 1 x {h} heads x {t} tokens x head_dim {d}, {dtype}: ms per layer, TFLOP/s"]
    runs = {"sdpa default": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    for name, be in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION),
                     ("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def run(be=be):
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        runs[name] = run
    runs["aten flash + lse"] = lambda: torch.ops.aten._scaled_dot_product_flash_attention(
        q, k, v, 0.0, True, False, scale=scale)
    runs["aten cudnn + lse"] = lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, True, False, scale=scale)
    outs = {}
    for name, fn in runs.items():
        try:
            s = timed(fn)
            outs[name] = fn()
            lines.append(f"  {name:18s} {s * 1e3:8.2f} ms  {flops / s / 1e12:6.0f} TFLOP/s")
        except Exception as e:  # a backend that refuses these inputs
            lines.append(f"  {name:18s} refused: {type(e).__name__}: {str(e)[:160]}")
    ref = outs.get("sdpa default")
    fl, cu = outs.get("aten flash + lse"), outs.get("aten cudnn + lse")
    for name, o in (("aten flash + lse", fl), ("aten cudnn + lse", cu)):
        if o is not None and ref is not None:
            lines.append(f"  {name}: out max |diff| vs sdpa default {(o[0].float() - ref.float()).abs().max():.3g}, "
                         f"lse shape {tuple(o[1].shape)} dtype {o[1].dtype}")
    if fl is not None and cu is not None:
        a, b = fl[1].float(), cu[1].float().reshape(fl[1].shape)
        lines.append(f"  lse cudnn vs flash: max |diff| {(a - b).abs().max():.3g} (flash lse range "
                     f"{a.min():.3g}..{a.max():.3g})")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.profile_prefill", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--method", default="zeromerge")
    p.add_argument("--context", type=int, default=40960)
    p.add_argument("--kv-budget", type=int, default=2048)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--ops", default="triton")
    p.add_argument("--device", default="cuda")
    p.add_argument("--eager-prefill", action="store_true", help="no compiled elementwise kernels in the prefill")
    p.add_argument("--out", type=Path, default=Path("out/profile_prefill"))
    ns = p.parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    report: list[str] = []
    kw = {} if ns.method == "full" else {"kv_budget": ns.kv_budget}
    max_seq_len = ns.context + 64
    dev = torch.device(ns.device)
    cuda = dev.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    gen = zmzoo.load(ns.model, weights="random", device=dev, dtype=dtype, compile=False, method=ns.method,
                     max_seq_len=max_seq_len, ops=ns.ops, gemv="torch",  # prompts never use the decode kernel
                     args_overrides={"n_layers": ns.layers, "max_position_embeddings": max_seq_len}, **kw)
    # the prompt's elementwise work compiled, as zmzoo.load(compile=True) sets it on CUDA
    gen.model.set_prefill_kernels(PrefillKernels() if cuda and not ns.eager_prefill else None)
    a = gen.args
    with torch.inference_mode():
        if cuda:
            report += attention_backends(ns.context, a.n_heads, a.head_dim, torch.bfloat16)
        ids = torch.randint(0, a.vocab_size, (1, ns.context), device=dev)
        s = timed(lambda: gen.model.prefill(ids, row=0), repeats=3)
        peak = float("nan")
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            gen.model.prefill(ids, row=0)
            peak = torch.cuda.max_memory_allocated() / 2**30
        report.append(f"\n{ns.model} {ns.layers} layers, {ns.method}, ops={ns.ops}, prefill of {ns.context} tokens: "
                      f"{s * 1e3:.1f} ms ({s * 1e3 / ns.layers:.1f} ms per layer with the embedding and output "
                      f"shared), peak {peak:.2f} GiB")
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            gen.model.prefill(ids, row=0)
            sync()
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=70)
    report += ["", table]
    text = "\n".join(report)
    print(text)
    (ns.out / f"prefill-{ns.method}-{ns.context}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()

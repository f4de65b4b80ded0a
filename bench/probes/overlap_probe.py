"""Probe: how much of the copy bandwidth a read of a given size reaches, and whether the next weight product's matrix
can be pulled into the L2 cache while the latency-bound part of a ZeroMerge decode layer runs.

    python -m bench.probes.overlap_probe --out OUT

1. Read bandwidth against size: a Triton kernel sums a buffer of 8 MB .. 1 GB (distinct buffers cycled in a CUDA
   graph, so nothing is served by the L2), best of a few launch settings, as a fraction of the copy bandwidth. The
   ramp and tail of one kernel are what a small read cannot hide.
2. One ZeroMerge layer's attention part at LLaMA-2-7B widths, batch 1, 2048 slots, cycling 16 layers' buffers:
   decode attention -> slot insert -> output projection (the Triton GEMV with the residual add), against the same
   with an L2 prefetch of the output projection's weight issued before the attention or between attention and
   insert, by a kernel of ``prefetch.global.L2::evict_last`` per 128-byte line or of
   ``cp.async.bulk.prefetch.L2`` per chunk.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton
import triton.language as tl

from bench.probes.ops import decode_inputs
from bench.timing import copy_bandwidth
from zmzoo.environment import environment
from zmzoo.ops._launch import time_graph
from zmzoo.ops.decode_attention import decode_attention
from zmzoo.ops.gemv import Fusion, gemv, tune, tuning_key
from zmzoo.ops.slot_insert import slot_insert


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.float32)
    base = pid.to(tl.int64) * BLOCK * ITERS
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


@triton.jit
def _prefetch_lines_kernel(x_ptr, n_lines, LINES: tl.constexpr, EVICT_LAST: tl.constexpr):
    offs = tl.program_id(0) * LINES + tl.arange(0, LINES)
    offs = tl.minimum(offs, n_lines - 1).to(tl.int64) * 128
    if EVICT_LAST:
        tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0;", "=r,l", [x_ptr + offs],
                                  dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [x_ptr + offs],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _prefetch_bulk_kernel(x_ptr, nbytes, CHUNK: tl.constexpr, PER: tl.constexpr):
    offs = (tl.program_id(0) * PER + tl.arange(0, PER)).to(tl.int64) * CHUNK
    size = tl.maximum(tl.minimum(nbytes - offs, CHUNK), 0).to(tl.int32)
    offs = tl.minimum(offs, nbytes - 16)
    tl.inline_asm_elementwise("{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; "
                              "mov.u32 $0, 0; }", "=r,l,r", [x_ptr + offs, size], dtype=tl.int32, is_pure=False,
                              pack=1)


def prefetch(w: torch.Tensor, kind: str) -> None:
    b = w.view(-1).view(torch.uint8)
    if kind.startswith("lines"):
        lines = 256
        n = triton.cdiv(b.numel(), 128)
        _prefetch_lines_kernel[(triton.cdiv(n, lines),)](b, n, LINES=lines, EVICT_LAST=kind == "lines-last",
                                                          num_warps=4)
    else:
        chunk, per = 4096, 32
        _prefetch_bulk_kernel[(triton.cdiv(b.numel(), chunk * per),)](b, b.numel(), CHUNK=chunk, PER=per,
                                                                      num_warps=1)


def read_curve(dev, bw) -> list[dict]:
    out = []
    for mb in (8, 16, 33.5, 67, 134, 268, 1024):
        n = int(mb * 2**20) // 2
        copies = max(1, min(16, int(512 * 2**20 // (2 * n))))
        bufs = [torch.randn(n, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        best = None
        for block, iters, warps in ((2048, 4, 4), (4096, 2, 8), (1024, 8, 4), (2048, 8, 8), (8192, 1, 8)):
            grid = triton.cdiv(n, block * iters)
            res = torch.empty(grid, device=dev)
            t = time_graph([lambda b=b: _read_kernel[(grid,)](b, res, n, BLOCK=block, ITERS=iters, num_warps=warps)
                            for b in bufs])
            if best is None or t < best[0]:
                best = (t, (block, iters, warps))
        rec = {"mb": mb, "us": best[0] * 1e6, "frac_copy": 2 * n / best[0] / bw, "config": best[1]}
        print(f"[read] {mb:7.1f} MB  {rec['us']:8.1f} us  {2 * n / best[0] / 1e12:5.2f} TB/s  "
              f"{rec['frac_copy']:6.1%} of copy  {best[1]}", flush=True)
        out.append(rec)
        del bufs
        torch.cuda.empty_cache()
    return out


def layer_probe(dev, bw, n_layers: int) -> dict:
    h, d, s_len = 32, 128, 2048
    layers = []
    for i in range(n_layers):
        inp = decode_inputs(1, h, h, s_len, d, torch.bfloat16, dev, kind="zm", seed=i)
        wo = (torch.randn(h * d, h * d, device=dev) * (h * d) ** -0.5).to(torch.bfloat16)
        x = torch.randn(1, h * d, device=dev, dtype=torch.bfloat16)
        layers.append((inp, wo, x))
    tuned = tune([(layers[0][1], Fusion(residual=True))], rows=(1,))
    for key, rec in tuned.items():
        print(f"[tune] {key[1]} x {key[2]} {key[5]}: torch {rec.times['torch'] * 1e6:.1f} us, kernel "
              f"{rec.times[rec.best] * 1e6:.1f} us", flush=True)
    wo_plan = tuned[tuning_key(1, layers[0][1], Fusion(residual=True))].plan("auto")  # None: torch measured faster
    pos = torch.tensor([s_len + 100], device=dev)
    base = torch.tensor([s_len], device=dev)
    ins = dict(dense=1, ring=s_len // 10 - 1, policy="merge", metric="dot", score_merge="max", backend="triton")

    def attn(inp):
        out, s_new = decode_attention(inp["q"], inp["k"], inp["v"], None, pos, inp["k_new"], inp["v_new"],
                                      w=inp["w"], scores=inp["scores"], decay=0.98, backend="triton")
        return out, s_new

    def insert(inp, s_new):
        slot_insert(inp["k"], inp["v"], inp["w"], inp["scores"], inp["k_new"], inp["v_new"], s_new, pos, base,
                    inp["dense_k"], inp["dense_v"], **ins)

    def wo_gemv(out, wo, x):
        return gemv(out.view(1, -1), wo, residual=x, backend="torch" if wo_plan is None else "triton", config=wo_plan)

    def make(variant):
        def one(inp, wo, x):
            pf = variant.split(":")[1] if ":" in variant else None
            if variant.startswith("before:"):
                prefetch(wo, pf)
            out, s_new = attn(inp)
            if variant.startswith("mid:"):
                prefetch(wo, pf)
            if "noinsert" not in variant:
                insert(inp, s_new)
            return wo_gemv(out, wo, x)
        return [lambda L=L: one(*L) for L in layers]

    res = {}
    parts = {
        "attention": [lambda L=L: attn(L[0]) for L in layers],
        "wo": [lambda L=L: wo_gemv(L[2], L[1], L[2]) for L in layers],
        "prefetch:lines-last": [lambda L=L: prefetch(L[1], "lines-last") for L in layers],
        "prefetch:bulk": [lambda L=L: prefetch(L[1], "bulk") for L in layers],
        "prefetch:lines-last -> wo": [lambda L=L: (prefetch(L[1], "lines-last"), wo_gemv(L[2], L[1], L[2]))
                                      for L in layers],
    }
    for name, calls in parts.items():
        try:
            res[name] = time_graph(calls)
            print(f"[part] {name:<28} {res[name] * 1e6:7.2f} us", flush=True)
        except Exception as e:  # keep going
            print(f"[part] {name}: failed {type(e).__name__}: {e}", flush=True)
            torch.cuda.synchronize()
    for variant in ("base", "base-noinsert", "before:lines-last", "mid:lines-last", "mid:lines", "mid:bulk",
                    "before:bulk", "mid:lines-last-noinsert"):
        try:
            res[variant] = time_graph(make(variant))
            print(f"[layer] {variant:<28} {res[variant] * 1e6:7.2f} us per layer (attention, insert, wo)", flush=True)
        except Exception as e:
            print(f"[layer] {variant}: failed {type(e).__name__}: {e}", flush=True)
            torch.cuda.synchronize()
    return {k: v * 1e6 for k, v in res.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.overlap_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--out", type=Path, default=Path("out/overlap_probe"))
    ns = p.parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)["bytes_per_s"]
    print(f"[copy] {bw / 1e12:.2f} TB/s read + write", flush=True)
    report = {"env": environment(), "copy_bytes_per_s": bw}
    with torch.no_grad():
        report["read"] = read_curve(dev, bw)
        report["layer_us"] = layer_probe(dev, bw, ns.layers)
    (ns.out / "overlap_probe.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()

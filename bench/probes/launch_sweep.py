"""Sweep of launch settings beyond the ones ``zmzoo.load`` tunes over: the GEMV (``zmzoo.ops.gemv``) per product and
fusion, and the decode attention's split kernel at batch 1, on the GPU, against what the kernels run by default.

    python -m bench.probes.launch_sweep --out OUT

GEMV: LLaMA-2-7B products (bf16, 1 row), each timed on 8 matrices of its shape cycled in a CUDA graph (more than the
L2 holds), every setting of ``--gemv-grid`` whose fp32 accumulator stays within 16-64 registers a thread; prints the
torch composition's time, the kernel at the setting ``zmzoo.ops.gemv.CANDIDATES`` would pick, and the five best
settings of the sweep. Attention: ZeroMerge's call (w, scores, new token), MHA 32 heads, D=128, 2048 slots.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch

from bench.probes.ops import decode_bytes, decode_inputs
from bench.timing import copy_bandwidth
from zmzoo.environment import environment
from zmzoo.ops._launch import sm_count, time_graph
from zmzoo.ops.decode_attention import _decode_attention_launch
from zmzoo.ops.gemv import CANDIDATES, Config, Fusion, tune, tuning_key

DIM, HIDDEN, QKV = 4096, 11008, 3 * 4096
PRODUCTS = {  # name: (N, K, Fusion)
    "wo+res": (DIM, DIM, Fusion(residual=True)),
    "w2+silu+res": (DIM, HIDDEN, Fusion(silu=True, residual=True)),
    "w2+res": (DIM, HIDDEN, Fusion(residual=True)),
    "qkv": (QKV, DIM, Fusion()),
}


def grid() -> list[Config]:
    out = []
    for bn, bk, warps, stages in itertools.product((2, 4, 8, 16), (512, 1024, 2048, 4096), (1, 2, 4, 8), (1, 2, 3)):
        regs = bn * bk / (32 * warps)  # fp32 accumulator registers a thread
        if 16 <= regs <= 64 and bk >= 256 * warps and (stages > 1 or bk >= 2048):
            out.append(Config(bn, bk, warps, stages))
    return out


def sweep_gemv(dev, names: list[str], bw: float) -> dict:
    res = {}
    cands = list(dict.fromkeys(list(CANDIDATES) + grid()))
    print(f"[gemv] {len(cands)} settings per product", flush=True)
    g = torch.Generator(device=dev).manual_seed(0)
    for name in names:
        n, k, fusion = PRODUCTS[name]
        ws = [(torch.randn(n, k, device=dev, generator=g) * k ** -0.5).to(torch.bfloat16) for _ in range(8)]
        times = tune([(w, fusion) for w in ws], rows=(1,), candidates=cands)[tuning_key(1, ws[0], fusion)].times
        torch_s = times["torch"]
        default = min((times[c] for c in CANDIDATES if c in times), default=float("nan"))
        ranked = sorted(((t, c) for c, t in times.items() if c != "torch"), key=lambda x: x[0])
        nbytes = n * k * 2
        print(f"[gemv] {name:<12} {n}x{k}: torch {torch_s * 1e6:6.1f} us, kernel at CANDIDATES {default * 1e6:6.1f} "
              f"us, roofline at copy bandwidth {nbytes / bw * 1e6:5.1f} us", flush=True)
        for t, c in ranked[:5]:
            print(f"[gemv]     {t * 1e6:6.1f} us  {nbytes / t / 1e12:4.2f} TB/s  {tuple(c)}", flush=True)
        res[name] = {"torch_us": torch_s * 1e6, "candidates_us": default * 1e6,
                     "best": [(t * 1e6, tuple(c)) for t, c in ranked[:10]]}
        del ws
        torch.cuda.empty_cache()
    return res


def sweep_attention(dev, bw: float) -> list:
    h, d, s_len = 32, 128, 2048
    sets = [decode_inputs(1, h, h, s_len, d, torch.bfloat16, dev, kind="zm", seed=i) for i in range(16)]
    nbytes = decode_bytes(sets[0])
    pos = torch.tensor([s_len + 100], device=dev)
    out = []
    for block_n, warps, stages, waves in ((32, 1, 3, 8), (32, 1, 3, 12), (32, 1, 3, 16), (32, 1, 2, 16),
                                          (16, 1, 3, 16), (16, 1, 2, 32), (64, 1, 3, 8), (64, 1, 2, 8),
                                          (64, 2, 3, 16), (32, 2, 3, 16), (128, 2, 2, 8), (128, 4, 2, 8)):
        n_splits = -(-waves * sm_count(dev) // h)
        kw = dict(block_n=block_n, n_splits=n_splits, num_warps=warps, num_stages=stages)

        def call(i, kw=kw):
            x = sets[i]
            return _decode_attention_launch(x["q"], x["k"], x["v"], None, pos, x["k_new"], x["v_new"], x["w"],
                                            x["scores"], 1.0, 0.98, d ** -0.5, 0, None, **kw)
        try:
            t = time_graph([lambda i=i: call(i) for i in range(len(sets))])
        except Exception as e:
            print(f"[attn] {kw}: failed {type(e).__name__}: {e}", flush=True)
            torch.cuda.synchronize()
            continue
        print(f"[attn] BLOCK_N={block_n} warps={warps} stages={stages} programs/SM={waves}: {t * 1e6:6.2f} us, "
              f"{nbytes / t / bw:5.1%} of copy", flush=True)
        out.append({**kw, "us": t * 1e6, "frac_copy": nbytes / t / bw})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.launch_sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--products", default=",".join(PRODUCTS))
    p.add_argument("--out", type=Path, default=Path("out/launch_sweep"))
    ns = p.parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)["bytes_per_s"]
    report = {"env": environment(), "copy_bytes_per_s": bw}
    with torch.no_grad():
        report["attention"] = sweep_attention(dev, bw)
        report["gemv"] = sweep_gemv(dev, ns.products.split(","), bw)
    (ns.out / "launch_sweep.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()

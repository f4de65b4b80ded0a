"""The weight products of a decode layer back to back, as a step runs them, without the attention.

Per layer: q|k|v with the attention RMSNorm, the output projection with the residual add, gate|up with the MLP
RMSNorm, down with the SiLU gate and the residual add (LLaMA-2-7B shapes, bf16, batch 1), chained over ``--layers``
layers' weights (more than the L2 cache holds) in one CUDA graph. Variants:

- ``torch``: ``zmzoo.ops.gemv.gemv_ref`` under torch.compile: cuBLAS, with the norm, SiLU gate and adds in inductor's
  fused elementwise kernels (what the decode step runs with ``gemv="torch"``);
- ``fused``: ``zmzoo.ops.gemv``'s kernel with the norm, SiLU gate and add inside (``gemv="triton"``), at the launch
  settings ``tune`` picks per product.

Prints microseconds per layer, and the weight bytes per layer over that time against the measured copy bandwidth.

    python -m bench.probes.gemv_chain --layers 8 --out out/gemv_chain
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from bench.timing import copy_bandwidth
from zmzoo.environment import environment
from zmzoo.ops._launch import time_graph
from zmzoo.ops.gemv import Config, Fusion, gemv, tune, tuning_key

DIM, HIDDEN, QKV = 4096, 11008, 3 * 4096


def make_layers(n: int, device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*size, scale=1.0):
        return (scale * torch.randn(*size, device=device, generator=g)).to(torch.bfloat16)

    return [{"wqkv": rand(QKV, DIM, scale=DIM**-0.5), "wo": rand(DIM, DIM, scale=DIM**-0.5),
             "w13": rand(2 * HIDDEN, DIM, scale=DIM**-0.5), "w2": rand(DIM, HIDDEN, scale=HIDDEN**-0.5),
             "g1": 1 + rand(DIM, scale=0.1), "g2": 1 + rand(DIM, scale=0.1)} for _ in range(n)]


def chain(x: torch.Tensor, layers: list[dict[str, torch.Tensor]], backend: str,
          plans: dict[str, Config] | None = None) -> torch.Tensor:
    """The four products of every layer; ``plans``: the kernel's launch setting per product (backend "triton")."""
    c = plans or {}
    for p in layers:
        qkv = gemv(x, p["wqkv"], norm=p["g1"], eps=1e-5, backend=backend, config=c.get("wqkv"))
        h = gemv(qkv[:, :DIM], p["wo"], residual=x, backend=backend, config=c.get("wo"))  # q: the attention's output
        gate_up = gemv(h, p["w13"], norm=p["g2"], eps=1e-5, backend=backend, config=c.get("w13"))
        x = gemv(gate_up, p["w2"], silu=True, residual=h, backend=backend, config=c.get("w2"))
    return x


FUSIONS = {"wqkv": Fusion(norm=True), "wo": Fusion(residual=True), "w13": Fusion(norm=True),
           "w2": Fusion(silu=True, residual=True)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.gemv_chain", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path, default=Path("out/gemv_chain"))
    ns = p.parse_args(argv)
    ns.out.mkdir(parents=True, exist_ok=True)
    dev = torch.device("cuda")
    bw = copy_bandwidth(dev)["bytes_per_s"]
    layers = make_layers(ns.layers, dev)
    layer_bytes = sum(t.numel() * t.element_size() for t in layers[0].values())
    tuned = tune([(layers[0][name], fusion) for name, fusion in FUSIONS.items()], rows=(1,))
    for key, rec in tuned.items():
        print(f"[tune] {key[1]} x {key[2]} {key[5]}: torch {rec.times['torch'] * 1e6:.1f} us, kernel "
              f"{rec.times[rec.best] * 1e6:.1f} us at {tuple(rec.best)}", flush=True)
    plans = {name: tuned[tuning_key(1, layers[0][name], fusion)].best for name, fusion in FUSIONS.items()}
    x = torch.randn(1, DIM, device=dev, dtype=torch.bfloat16)
    compiled = torch.compile(chain, fullgraph=True, dynamic=False)
    want = chain(x, layers, "torch").float()
    results = {}
    for name in ("torch", "fused"):
        with torch.no_grad():
            if name == "torch":
                def fn():
                    return compiled(x, layers, "torch")
            else:
                def fn():
                    return chain(x, layers, "triton", plans)
            got = fn().float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            t = time_graph([fn], reps=ns.reps) / ns.layers
        results[name] = {"us_per_layer": t * 1e6, "frac_copy_bw": layer_bytes / t / bw, "rel_err_vs_torch": err}
        print(f"{name:<10} {t * 1e6:7.1f} us/layer  {layer_bytes / t / 1e9:6.0f} GB/s  "
              f"{layer_bytes / t / bw:6.1%} of copy bandwidth  (max rel. difference from torch {err:.2e})",
              flush=True)
    report = {"env": environment(), "layers": ns.layers, "layer_bytes": layer_bytes, "copy_bytes_per_s": bw,
              "results": results}
    (ns.out / "gemv_chain.json").write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()

"""Prefill's transient memory without a GPU: the peak resident memory one layer's prefill adds, on the CPU.

    python -m bench.probes.prefill_memory --model llama2-7b --context 40960 --method zeromerge --kv-budget 2048

Builds the model with one layer at its real widths (bf16, random weights), prefills a random prompt of ``--context``
tokens and reports the process's peak resident set size above where it stood before the prefill. Large CPU
allocations are mapped and unmapped with each tensor, so this is the peak of the live activations of one layer; the
GPU peak of a full prefill is about weights + caches of every layer + this figure. Calibration: on 2026-11-29 this
gave 3547 MiB for LLaMA-2-7B, ZeroMerge, 40K tokens at commit 04b1767, where the H200 measured 17.08 GiB of peak
allocated memory = 13.57 GiB of weights and caches + 3.51 GiB.

The prompt scoring is replaced by random scores of the right shape: the Triton kernel that scores on the GPU holds
only (H, W) + (Hkv, T) fp32, while the CPU reference's chunked logits would dominate the figure. Everything else
(projections, RoPE, attention, selection, dense merge, MLP) runs as it does on the GPU.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

import zmzoo
import zmzoo.cache.zeromerge as zm_module


def rss_bytes() -> int:
    """Resident set size now (Linux: /proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.probes.prefill_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--context", type=int, default=40960)
    p.add_argument("--method", default="zeromerge")
    p.add_argument("--kv-budget", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    zm_module.prefill_scores = lambda q, k, **kw: torch.rand(k.shape[0], k.shape[1])
    kw = {} if ns.method == "full" else {"kv_budget": ns.kv_budget}
    gen = zmzoo.load(ns.model, weights="random", device="cpu", dtype=torch.bfloat16, compile=False,
                     max_seq_len=ns.context + 8, method=ns.method,
                     args_overrides={"n_layers": 1, "max_position_embeddings": ns.context + 8}, **kw)
    ids = torch.randint(0, gen.args.vocab_size, (1, ns.context))
    before = rss_bytes()
    t0 = time.perf_counter()
    with torch.inference_mode():
        gen.model.prefill(ids, row=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    act = ns.context * gen.args.dim * 2
    extra = peak - before
    print(f"{ns.model}, {ns.method}, {ns.context} tokens, bf16: one layer's prefill peaks {extra / 2**20:.0f} MiB "
          f"above its start ({extra / act:.1f} activations of {act / 2**20:.0f} MiB; "
          f"{time.perf_counter() - t0:.0f} s on the CPU)")


if __name__ == "__main__":
    main()

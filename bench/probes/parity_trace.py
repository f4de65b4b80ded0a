"""Where two code paths part: a tiny random model's generator on the torch reference ops (eager) and one on the
Triton ops (compiled with CUDA graphs on CUDA; eager in the interpreter on a CPU), fed the same tokens; after the
prefill and after every decode step, the largest difference of the logits and of each live cache buffer (slots with
w > 0), and the first step where one exceeds the tolerance, with what the slots held there.

    python -m bench.probes.parity_trace --method knorm --kv-budget 16 --steps 48 --out OUT

The forced tokens are the reference's greedy continuation. Prints one line per step; writes OUT/parity.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import zmzoo


def build(method: str, ops: str, compile: bool, ns) -> zmzoo.Generator:
    tiny = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, intermediate_size=96, vocab_size=128,
                max_position_embeddings=256)
    kw = {} if method == "full" else dict(kv_budget=ns.kv_budget)
    return zmzoo.load("llama2-7b", weights="random", args_overrides=tiny, dtype=torch.float32, method=method,
                      compile=compile, ops=ops, max_batch_size=2, max_seq_len=96, verbose=False, **kw)


def live_diff(ref, got) -> dict[str, float]:
    """Largest |difference| per cache buffer, over the slots both runs hold (w > 0 in the reference)."""
    out = {}
    for (li, a), (_, b) in zip(enumerate(ref.model.caches), enumerate(got.model.caches)):
        w = getattr(a, "w", None)
        for name in ("k", "v", "w", "s"):
            x, y = getattr(a, name, None), getattr(b, name, None)
            if x is None:
                continue
            d = (x.float() - y.float()).abs()
            if w is not None and name in ("k", "v"):
                d = d * (w > 0).unsqueeze(-1)
            out[f"{li}.{name}"] = float(d.max())
    return out


@torch.inference_mode()  # the Generators' buffers are inference tensors
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="knorm")
    p.add_argument("--kv-budget", type=int, default=16)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--out", required=True)
    ns = p.parse_args(argv)
    torch.manual_seed(0)
    ref = build(ns.method, "torch", False, ns)
    got = build(ns.method, "triton", torch.cuda.is_available(), ns)  # random weights are seeded: the same model
    prompts = [[1, 2, 3], list(range(10, 40))]
    forced = ref.generate(prompts, max_new_tokens=ns.steps, return_ids=True)
    rows = []
    la, lb = ref.prefill(prompts), got.prefill(prompts)
    first = None
    for step in range(ns.steps):
        if step == 0:
            dl = max(float((x - y).abs().max()) for x, y in zip(la, lb))
        tok = torch.tensor([f[step] for f in forced], device=ref.device)
        bufs = live_diff(ref, got)
        worst = max(bufs, key=bufs.get)
        rows.append(dict(step=step, logits=dl, worst=worst, worst_diff=bufs[worst], buffers=bufs))
        print(f"step {step:3d}: logits {dl:.2e}  worst buffer {worst} {bufs[worst]:.2e}", flush=True)
        if first is None and (dl > ns.tol or bufs[worst] > ns.tol):
            first = step
            for c, name in ((ref, "ref"), (got, "got")):
                cache = c.model.caches[int(worst.split(".")[0])]
                rows[-1][f"{name}_s"] = getattr(cache, "s", torch.zeros(0)).tolist()
                rows[-1][f"{name}_w"] = getattr(cache, "w", torch.zeros(0)).tolist()
            print(f"  first step over {ns.tol:g}: ref s {rows[-1]['ref_s']}\n  got s {rows[-1]['got_s']}", flush=True)
        a = ref.decode_step(tok, ref.pos)
        ref.pos.add_(1)
        b = got.decode_step(tok, got.pos)
        got.pos.add_(1)
        dl = float((a - b).abs().max())
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parity.json").write_text(json.dumps(dict(method=ns.method, kv_budget=ns.kv_budget, first=first,
                                                     rows=rows), indent=1))
    print(f"first step over {ns.tol:g}: {first}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

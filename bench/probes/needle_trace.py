"""Where does a compressed cache lose the passkey? A diagnostic beside bench/quality.py.

For passkey prompts (the harness's own builder, ``bench.tasks.passkey``), each configuration is run alone
(``Generator.with_cache``): prefill, then greedy decoding. Three stages are told apart:

- prefill selection: after prefill (and the lookahead draft, if any), the share of (layer, KV head) pairs that still
  hold every digit token of the key as an individual slot (weight 1, key bit-identical to the prompt's);
- decode demotion: the same share after decoding the answer (a drop means decode-time merging/eviction lost it);
- the answer: correct or not.

``oracle`` configurations add a large bonus to the key's digit tokens in every head's prompt scores, so they are kept
by the selection: if an oracle run answers correctly, what the method lacks is the selection, not the budget. The
prompt's keys and the bonus go through the caches' diagnostic hook (``ZeroMergeCache.prompt_hook``), which sees the
prompt's keys and scores before the selection.

    python -m bench.probes.needle_trace --lengths 1024 --depths 0.25,0.5 --budget 0.1 \
        --configs full,zeromerge,zeromerge+oracle,zeromerge:retrieval,snapkv,h2o
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import sys
from pathlib import Path

import torch

from bench.tasks import passkey
from bench.tasks.texts import load_texts, prose_sentences


def find_sub(ids: list[int], sub: list[int]) -> int:
    return next((i for i in range(len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub), -1)


def kept_share(caches, prompt_keys: list[torch.Tensor], positions: list[int]) -> tuple[float, float]:
    """(share of (layer, head) keeping all positions, share of (layer, head, position) kept) as weight-1 slots."""
    all_kept, any_kept = [], []
    for cache, kp in zip(caches, prompt_keys):
        k, w = cache.k[0].float(), cache.w[0]
        for h in range(k.shape[0]):
            single = k[h][w[h] == 1]
            hit = [bool(((single - kp[h, p].float()).abs().amax(-1) == 0).any()) for p in positions]
            all_kept.append(all(hit))
            any_kept += hit
    return sum(all_kept) / len(all_kept), sum(any_kept) / len(any_kept)


def run(base, ids: list[int], spec: str, frac: float, positions: list[int], steps: int):
    """``spec`` ("method[:preset][+oracle]") alone on ``ids``: (answer, kept after prefill, kept after decoding)."""
    t = len(ids)
    oracle = spec.endswith("+oracle")
    method, _, preset = spec.removesuffix("+oracle").partition(":")
    kw = {} if method == "full" else {"kv_budget": math.floor(frac * t), "preset": preset or None}
    gen = base.with_cache(method, max_seq_len=t + steps + 1, max_batch_size=1, compile=False, **kw)
    caches = gen.model.caches
    keys: list[torch.Tensor | None] = [None] * len(caches)
    for layer, c in enumerate(caches if method != "full" else []):  # the full cache keeps every token: no trace

        def hook(row, k, scores, layer=layer):
            keys[layer] = k[0].clone()  # (Hkv, T, D)
            if not oracle:
                return None
            if scores is None:
                raise SystemExit(f"{spec}: {method} does not score the prompt, so there is nothing for an oracle to "
                                 f"add to")
            scores = scores.clone()
            scores[:, positions] += 1e6
            return scores

        c.prompt_hook = hook
    with torch.inference_mode():
        tok = gen.prefill([ids])[0].argmax(-1)  # with the prefill draft, where the configuration has a lookahead
        after_prefill = kept_share(caches, keys, positions) if method != "full" else (1.0, 1.0)
        out = [tok.item()]
        for _ in range(steps - 1):
            tok = gen.decode_step(tok, gen.pos).argmax(-1)
            gen.pos += 1
            out.append(tok.item())
        after_decode = kept_share(caches, keys, positions) if method != "full" else (1.0, 1.0)
    eos = set(gen.tokenizer.eos_ids)
    cut = next((i for i, x in enumerate(out) if x in eos), len(out))
    return gen.tokenizer.decode(out[:cut], skip_special_tokens=True).strip(), after_prefill, after_decode


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probes.needle_trace", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--configs", default="full,zeromerge,zeromerge+oracle,zeromerge:retrieval,snapkv,h2o")
    p.add_argument("--budget", type=float, default=0.1, help="fraction of each prompt's length")
    p.add_argument("--lengths", default="1024")
    p.add_argument("--depths", default="0.25,0.5")
    p.add_argument("--filler", default="repeat,prose")
    p.add_argument("--style", default="passkey")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--out", help="write the rows as JSON here")
    ns = p.parse_args(argv)
    import zmzoo

    base = zmzoo.load(ns.model, method="full", compile=False, max_seq_len=64, device=ns.device, dtype=ns.dtype)
    tok = base.tokenizer
    prose = prose_sentences(load_texts(None))
    rows = []
    for filler, length, depth in itertools.product(ns.filler.split(","), [int(x) for x in ns.lengths.split(",")],
                                                   [float(x) for x in ns.depths.split(",")]):
        rng = random.Random(f"{ns.seed}-{filler}-{length}-{depth}")
        key = str(rng.randrange(10000, 100000))
        ids, _ = passkey.build_prompt(tok, length=length, depth=depth, filler=filler, style=ns.style, key=key,
                                      prose=prose, rng=rng)
        digits = tok.encode(key, add_bos=False)
        at = find_sub(ids, digits)
        if at < 0:
            raise SystemExit(f"key {key} is not tokenised alone in the prompt; cannot trace its tokens")
        positions = list(range(at, at + len(digits)))
        cells = [f"{filler:6s} {len(ids):5d} tok depth {depth:g} key {key}"]
        for spec in ns.configs.split(","):
            answer, pre, dec = run(base, ids, spec, ns.budget, positions, ns.steps)
            ok = passkey.correct(answer, key)
            rows.append({"filler": filler, "prompt_len": len(ids), "depth": depth, "key": key, "config": spec,
                         "answer": answer, "correct": ok, "heads_keeping_all_digits_after_prefill": pre[0],
                         "digits_kept_after_prefill": pre[1], "heads_keeping_all_digits_after_decode": dec[0],
                         "digits_kept_after_decode": dec[1]})
            cells.append(f"{spec}: {'ok' if ok else 'MISS'} heads {pre[0]:.2f}->{dec[0]:.2f} digits {pre[1]:.2f}")
        print(" | ".join(cells), flush=True)
    print("\naccuracy: " + ", ".join(f"{c} {sum(r['correct'] for r in rows if r['config'] == c)}/"
                                    f"{sum(r['config'] == c for r in rows)}" for c in ns.configs.split(",")))
    if ns.out:
        Path(ns.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

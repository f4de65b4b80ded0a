"""Lookahead settings against each other on the passkey task: the full cache and each ZeroMerge setting per prompt,
one line per prompt, a tally at the end (the sweep behind docs/retrieval.md's tuning tables).

    python -m bench.probes.lookahead_sweep 0.1 "lookahead=32,lookahead_greedy=8;lookahead=32,score_pool=9" \
        512,1024,2048

Arguments: the budget as a fraction of each prompt's tokens; settings sets separated by ``;`` (each a comma-separated
list of ZeroMerge settings, empty for plain ZeroMerge; short names ``la`` = lookahead, ``pool`` = score_pool,
``w`` = lookahead_prompt_weight; ``true``/``false`` for a switch); the prompt lengths. Prompts:
``bench.tasks.passkey`` with the harness's seeds (seed 0, trial 0, needle style ``passkey``), fillers ``repeat`` and
``prose`` (Python's language reference), depths 0.25, 0.5 and 0.75; greedy, 14 answer tokens, SmolLM2-135M-Instruct
in fp32 on the CPU, eager.
"""

from __future__ import annotations

import itertools
import math
import random
import sys

import zmzoo
from bench.tasks import passkey
from bench.tasks.texts import load_texts, prose_sentences

SHORT = {"la": "lookahead", "pool": "score_pool", "w": "lookahead_prompt_weight", "win": "score_window"}


def parse(settings: str) -> dict:
    kw = {}
    for part in filter(None, settings.split(",")):
        k, v = part.split("=")
        bools = {"true": True, "false": False}
        kw[SHORT.get(k, k)] = bools[v.lower()] if v.lower() in bools else float(v) if "." in v else int(v)
    return kw


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    frac, configs = float(argv[0]), argv[1].split(";")
    lengths = [int(x) for x in argv[2].split(",")] if len(argv) > 2 else [512, 1024, 2048]
    base = zmzoo.load("smollm2-135m", compile=False, max_seq_len=max(lengths) + 152, verbose=False)
    tok, prose = base.tokenizer, prose_sentences(load_texts(None))
    tally: dict[str, list[int]] = {}
    for filler, length, depth in itertools.product(("repeat", "prose"), lengths, (0.25, 0.5, 0.75)):
        rng = random.Random(f"0-{filler}-passkey-{length}-{depth}-0")
        key = str(rng.randrange(10000, 100000))
        ids, _ = passkey.build_prompt(tok, length=length, depth=depth, filler=filler, style="passkey", key=key,
                                      prose=prose, rng=rng)
        budget = math.floor(frac * len(ids))
        res = {"full": passkey.correct(base.generate(ids, max_new_tokens=14), key)}
        last = ""
        for c in configs:
            last = base.with_cache("zeromerge", kv_budget=budget, **parse(c)).generate(ids, max_new_tokens=14)
            res[c or "plain"] = passkey.correct(last, key)
        for k, v in res.items():
            tally.setdefault(k, [0, 0])
            tally[k][0] += v
            tally[k][1] += 1
        print(f"{filler} {len(ids)} d{depth} B={budget} key {key}: " +
              " ".join(f"[{k}]={int(v)}" for k, v in res.items()) + f"  {last!r}", flush=True)
    print("TOTAL", {k: f"{a}/{b}" for k, (a, b) in tally.items()}, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

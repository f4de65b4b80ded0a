"""Host time of the retrieval preset's prompt lookup (``zmzoo.models.transformer.prompt_lookup``), which runs once per
prefill between the draft's decode steps and its rescore, the GPU waiting: median of repeats at prompt lengths, for a
draft found nowhere (every stretch length tried) and one found at once (8 tokens).

    python -m bench.probes.prompt_lookup_speed [--lengths 4096,40960] [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from zmzoo.models.transformer import prompt_lookup


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="4096,40960")
    p.add_argument("--repeats", type=int, default=5)
    ns = p.parse_args(argv)
    r = random.Random(0)
    print(f"{'prompt':>8} {'draft':<12} {'median ms':>10}")
    for n in (int(x) for x in ns.lengths.split(",")):
        prompt = [r.randrange(32000) for _ in range(n)]
        for what, draft in (("found nowhere", [r.randrange(32000) for _ in range(8)]),
                            ("found, 8", prompt[n // 4 : n // 4 + 8])):
            ts = []
            for _ in range(ns.repeats):
                t0 = time.perf_counter()
                prompt_lookup(prompt, draft, 32)
                ts.append(time.perf_counter() - t0)
            print(f"{n:>8} {what:<12} {1e3 * statistics.median(ts):>10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

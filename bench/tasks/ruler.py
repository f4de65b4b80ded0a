"""RULER's synthetic tasks (``bench/ruler.py``: generated offline, scored as RULER scores them) in the quality
harness: each (task, length, seed) sample is generated once and every configuration runs on it side by side
(``Harness.run``: one prefill, then all configurations decode greedily as the rows of one batch), for up to the task's
``max_new_tokens`` (decoding ends once every row has produced an eos token, as ``Generator.generate`` stops). A row's
prediction is its tokens up to its first eos, detokenized as ``Generator.generate`` does (``zmzoo.generate.RowText``),
and its score ``bench.ruler.score``: RULER's ``string_match_all``, in [0, 1] per sample; summaries are in 0-100.

The prompt is ``bench.ruler.prompt_ids``: the sample as the user's message in the chat template, the answer prefix
after the assistant header. A length L (``length`` in the rows) is read as ``convention`` says:
- ``total`` (RULER's ``max_seq_length``, the default): the tokens fed (template included) plus the task's
  ``max_new_tokens`` are at most L, so a sample of L = the model's context window fits it; the sample is generated at
  ``bench.ruler.generate`` length ``L - max_new_tokens - template tokens`` (``target`` in the rows), lowered further if
  tokens merging across the template's edges still overshoot;
- ``prompt``: ``bench.ruler.generate``'s own length (prompt + answer prefix, no template), as ``bench/ruler.py``'s
  driver reads ``--length``.
``sample_tokens`` is the sample's length as ``bench.ruler.generate`` counts it, ``prompt_tokens`` what the model is
fed, what budgets are fractions of. Samples are seeds ``seed .. seed + samples - 1`` of each (task, length).

``run`` calls ``checkpoint`` after every prompt, and takes the rows of an earlier run (``done``) to skip what they
measured: a configuration whose row for a (task, length, seed) is there is not run again there (the harness's
``--resume``), so an interrupted run goes on where it stopped, and a run with more configurations, lengths or samples
only measures what is new.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

from bench import ruler
from bench.tasks.common import Harness
from zmzoo.generate import RowText

PREDICTION_CHARS = 300  # a row keeps this much of its prediction (the score is of the whole of it)
SHORT = {"niah_single_1": "s1", "niah_single_2": "s2", "niah_single_3": "s3", "niah_multikey_1": "mk1",
         "niah_multikey_2": "mk2", "niah_multikey_3": "mk3", "niah_multivalue": "mv", "niah_multiquery": "mq",
         "vt": "vt", "cwe": "cwe", "fwe": "fwe"}
MEASURED = ("per sample: RULER's metric of the task (string_match_all: the fraction of the references found, "
            "case-insensitive, in the greedy prediction up to its first eos); per (configuration, length, task): the "
            "mean over samples, 0-100; per (configuration, length): the mean over tasks of those, 0-100")


def tasks_arg(value: str) -> list[str]:
    """``--ruler-tasks``: comma-separated names of ``bench.ruler.TASKS`` (or their short names), or all."""
    if value == "all":
        return list(ruler.TASKS)
    by_short = {v: k for k, v in SHORT.items()}
    out = []
    for t in (x for x in value.split(",") if x):
        t = by_short.get(t, t)
        if t not in ruler.TASKS:
            raise SystemExit(f"--ruler-tasks {t!r} is not one of {', '.join(ruler.TASKS)} (or all)")
        out.append(t)
    return out


CONVENTIONS = ("total", "prompt")


def make_sample(task: str, tok: Any, length: int, *, seed: int, prose: ruler.Prose,
                convention: str = "total") -> tuple[ruler.Sample, list[int], int]:
    """The sample of ``task`` at ``length`` read as ``convention`` says (``CONVENTIONS``, see the module's doc): the
    ``Sample``, the prompt's token ids and the length it was generated at. ValueError when it cannot be generated."""
    if convention == "prompt":
        sample = ruler.generate(task, tok, length, seed=seed, prose=prose)
        return sample, ruler.prompt_ids(tok, sample), length
    if convention != "total":
        raise ValueError(f"RULER length convention {convention!r} is not one of {', '.join(CONVENTIONS)}")
    mnt = ruler.TASKS[task].max_new_tokens
    template = len(ruler.prompt_ids(tok, ruler.Sample("", [], "", mnt)))
    target = length - mnt - template
    for _ in range(4):
        sample = ruler.generate(task, tok, target, seed=seed, prose=prose)
        ids = ruler.prompt_ids(tok, sample)
        over = len(ids) + mnt - length
        if over <= 0:
            return sample, ids, target
        target -= over
    raise ValueError(f"{task}: no sample of {length} tokens in all (template and {mnt} new tokens included) found")


def evaluate(h: Harness, task: str, sample: ruler.Sample, ids: list[int]) -> tuple[dict[str, dict[str, Any]], Any]:
    """Every configuration of ``h`` on one sample's prompt ``ids``: label -> its new tokens up to the first eos
    (``tokens``), their text (``prediction``) and ``score``; and the ``Comparison`` (its ``skipped``)."""
    tok = h.gen.tokenizer
    eos = set(tok.eos_ids)
    res = h.run(ids, steps=sample.max_new_tokens, stop_ids=sorted(eos))
    out = {}
    for label, seq in zip(res.labels, res.tokens.tolist()):
        row = RowText(tok, [], eos)  # what Generator.generate makes of these tokens
        row.add(seq)
        row.finish()
        out[label] = {"tokens": row.ids, "prediction": row.text,
                      "score": ruler.score(task, row.text, sample.references)}
    return out, res


def _key(r: dict[str, Any]) -> tuple:
    return r["task"], r["length"], r["seed"], r["label"]


def run(h: Harness, *, tasks: list[str], lengths: list[int], samples: int, seed: int, prose: str = "installed",
        convention: str = "total", done: dict[str, Any] | None = None,
        checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Every (length, task, seed) sample, lengths in the outer loop (an interrupted run has its shorter lengths
    whole), through every configuration of ``h``.

    Args:
        tasks, lengths, samples, seed: what to generate (``make_sample(task, tok, length, seed=s, ...)`` for ``s``
            in ``seed .. seed + samples - 1``).
        prose: ``bench.ruler``'s prose source for the essay haystacks and word lists.
        convention: how a length is read: ``total`` (RULER's, template and new tokens included) or ``prompt``.
        done: an earlier result of this function (its ``rows`` and ``prompts``): its rows of ``h``'s configurations
            are kept, and those configurations not run again on their samples; its rows of other configurations or
            samples are carried as they are.
        checkpoint: called with the result so far after every sample (the harness writes its JSON there).
    Returns:
        ``rows`` (one per sample and configuration: score, prediction, references, or why it was skipped),
        ``prompts`` (one per sample: its lengths, seconds, decode steps, what was drawn), ``summary``, the
        ``prose`` source and what was measured.
    """
    tok = h.gen.tokenizer
    src = ruler.load_prose(prose)
    labels = h.labels
    done = done or {}
    here = {(t, n, s) for n in lengths for t in tasks for s in range(seed, seed + samples)}  # this run's samples
    prior = {_key(r): r for r in done.get("rows", []) if r.get("label") in labels and "error" not in r}
    prior_prompts: dict[tuple, list[dict[str, Any]]] = {}
    for p in done.get("prompts", []):
        prior_prompts.setdefault((p["task"], p["length"], p["seed"]), []).append(p)
    # what the earlier run measured beyond this run's samples and configurations is carried as it is
    rows: list[dict[str, Any]] = [r for r in done.get("rows", [])
                                  if r.get("label") not in labels or _key(r)[:3] not in here]
    prompts: list[dict[str, Any]] = [p for k, ps in prior_prompts.items() if k not in here for p in ps]
    result = {"tasks": tasks, "lengths": lengths, "length_convention": convention, "samples": samples, "seed": seed,
              "prose": src.source,
              "prose_name": src.name, "rows": rows, "prompts": prompts, "measured": MEASURED, "complete": False}

    def snapshot() -> dict[str, Any]:
        result["summary"] = summary(rows, labels)
        result["timing"] = timing(prompts)
        return result

    n_all = len(lengths) * len(tasks) * samples
    i = 0
    warned: set[tuple[str, int]] = set()
    for length in lengths:
        for task in tasks:
            for s in range(seed, seed + samples):
                i += 1
                kept = [prior[k] for lab in labels if (k := (task, length, s, lab)) in prior]
                todo = [lab for lab in labels if (task, length, s, lab) not in prior]
                rows += kept
                if kept:
                    prompts += prior_prompts.get((task, length, s), [])
                if not todo:
                    continue
                try:
                    sample, ids, target = make_sample(task, tok, length, seed=s, prose=src, convention=convention)
                except ValueError as e:  # a length the task cannot be generated at (too short, too few words)
                    rows += [{"task": task, "length": length, "seed": s, "label": lab, "error": str(e)}
                             for lab in todo]
                    print(f"[quality] ruler {task} length {length} seed {s}: not generated: {e}", flush=True)
                    continue
                window = h.gen.args.max_position_embeddings
                if len(ids) + sample.max_new_tokens > window and (task, length) not in warned:
                    warned.add((task, length))
                    print(f"[quality] warning: ruler {task} at {length}: {len(ids)} prompt tokens + "
                          f"{sample.max_new_tokens} new exceed the model's window of {window} (--ruler-length total "
                          f"keeps a length within it)", flush=True)
                if any(r.get("prompt_tokens") not in (None, len(ids)) for r in kept):
                    raise SystemExit(f"--resume: ruler {task} length {length} seed {s} is {len(ids)} tokens now, "
                                     f"{kept[0]['prompt_tokens']} in the results resumed (another tokenizer or "
                                     f"prose?): use another --out")
                sub = h if len(todo) == len(labels) else h.subset(todo)
                t0 = time.perf_counter()
                got, res = evaluate(sub, task, sample, ids)
                dt = time.perf_counter() - t0
                meta = {k: v for k, v in sample.meta.items() if k not in ("prose", "task", "seed", "target_length")}
                prompts.append({"task": task, "length": length, "seed": s, "target": target,
                                "sample_tokens": sample.meta["length"],
                                "prompt_tokens": len(ids), "max_new_tokens": sample.max_new_tokens,
                                "steps": int(res.tokens.shape[1]), "configs": len(res.labels),
                                "seconds": round(dt, 2), "prefill_s": round(res.prefill_s, 2),
                                "decode_s": round(res.decode_s, 2), "meta": meta})
                for lab in todo:
                    c = h.config(lab)
                    base = {"task": task, "length": length, "target": target, "sample_tokens": sample.meta["length"],
                            "prompt_tokens": len(ids), "seed": s, "label": lab, "method": c.method,
                            "budget": c.frac, "slots": c.slots(len(ids))}
                    if lab in res.skipped:
                        rows.append({**base, "skipped": res.skipped[lab]})
                        continue
                    g = got[lab]
                    rows.append({**base, "score": g["score"], "prediction": g["prediction"][:PREDICTION_CHARS],
                                 "prediction_chars": len(g["prediction"]), "new_tokens": len(g["tokens"]),
                                 "references": sample.references})
                full = got.get("full")
                mean = statistics.mean(g["score"] for g in got.values()) if got else float("nan")
                print(f"[quality] ruler {i}/{n_all} {task} at {length}: {len(ids)} tokens + up to "
                      f"{sample.max_new_tokens} new, seed {s}: "
                      f"{len(got)} configs, {dt:.1f}s (prefill {res.prefill_s:.1f}s, {res.tokens.shape[1]} steps "
                      f"{res.decode_s:.1f}s); mean score {100 * mean:.0f}"
                      + (f"; full {100 * full['score']:.0f}: {ruler.postprocess(full['prediction'])[:50]!r}"
                         if full else "") + (f"; skipped {', '.join(res.skipped)}" if res.skipped else ""),
                      flush=True)
                if res.prefill_max_diff > 1e-3:
                    print(f"[quality] warning: prefill outputs differ across caches by {res.prefill_max_diff:.2e}")
                if checkpoint:
                    checkpoint(snapshot())
    result["complete"] = True
    return snapshot()


def merge(parts: list[dict[str, Any]], labels: list[str] | None = None) -> dict[str, Any]:
    """Several results of ``run`` that measured disjoint samples the same way (parallel runs over different tasks or
    lengths, as ``bench/h200.sh``'s ``ruler`` stage makes) as one: rows and prompts together, ``summary`` and
    ``timing`` over all of them. ValueError when the parts were measured otherwise (their ``fingerprint``, prose or
    length convention differ) or two parts both hold a row of the same (task, length, seed, configuration)."""
    if not parts:
        raise ValueError("merge: no RULER results given")
    first = parts[0]
    for i, p in enumerate(parts[1:], 1):
        for k in ("fingerprint", "prose", "length_convention"):
            if p.get(k) != first.get(k):
                raise ValueError(f"merge: part {i} was measured with {k} {p.get(k)!r}, part 0 with "
                                 f"{first.get(k)!r}")
    rows: list[dict[str, Any]] = []
    seen: dict[tuple, int] = {}
    for i, p in enumerate(parts):
        for r in p["rows"]:
            k = _key(r)
            if k in seen:
                raise ValueError(f"merge: parts {seen[k]} and {i} both measured {k}")
            seen[k] = i
            rows.append(r)
    prompts = [q for p in parts for q in p.get("prompts", [])]
    out = {k: v for k, v in first.items() if k not in ("rows", "prompts", "summary", "timing")}
    out.update(tasks=[t for t in ruler.TASKS if any(t in p["tasks"] for p in parts)],
               lengths=sorted({n for p in parts for n in p["lengths"]}),
               complete=all(p.get("complete") for p in parts), rows=rows, prompts=prompts,
               summary=summary(rows, labels), timing=timing(prompts),
               seconds=sum(p.get("seconds", 0.0) for p in parts))
    return out


def summary(rows: list[dict[str, Any]], labels: list[str] | None = None) -> dict[str, Any]:
    """Mean scores (0-100): ``cells`` per (configuration, length, task) over samples; ``by_length`` per
    (configuration, length) over the tasks it has cells for (``tasks``; ``complete`` when that is every task measured
    at that length); ``overall`` per configuration over its lengths."""
    cells: dict[tuple, list[float]] = {}
    meta: dict[str, tuple] = {}
    for r in rows:
        if "score" not in r:
            continue
        cells.setdefault((r["label"], r["length"], r["task"]), []).append(r["score"])
        meta[r["label"]] = (r["method"], r["budget"])
    order = {lab: i for i, lab in enumerate(labels or [])}
    keys = sorted(cells, key=lambda k: (order.get(k[0], len(order)), k[0], k[1], list(ruler.TASKS).index(k[2])))
    tasks_at: dict[int, set[str]] = {}
    for _, n, t in keys:
        tasks_at.setdefault(n, set()).add(t)
    out_cells = [{"label": k[0], "method": meta[k[0]][0], "budget": meta[k[0]][1], "length": k[1], "task": k[2],
                  "score": 100 * statistics.mean(cells[k]), "n": len(cells[k])} for k in keys]
    by: dict[tuple, list[float]] = {}
    for c in out_cells:
        by.setdefault((c["label"], c["length"]), []).append(c["score"])
    by_length = [{"label": lab, "method": meta[lab][0], "budget": meta[lab][1], "length": n,
                  "score": statistics.mean(v), "tasks": len(v), "complete": len(v) == len(tasks_at[n])}
                 for (lab, n), v in by.items()]
    overall: dict[str, list[float]] = {}
    for b in by_length:
        overall.setdefault(b["label"], []).append(b["score"])
    return {"cells": out_cells, "by_length": by_length,
            "overall": {lab: statistics.mean(v) for lab, v in overall.items()}}


def timing(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per length: the samples run, the mean seconds of one (all its configurations side by side), of its prefill and
    its decode, the mean decode steps and configurations run."""
    by: dict[int, list[dict[str, Any]]] = {}
    for p in prompts:
        by.setdefault(p["length"], []).append(p)
    return [{"length": n, "samples": len(ps), "seconds": statistics.mean(p["seconds"] for p in ps),
             "prefill_s": statistics.mean(p.get("prefill_s", 0.0) for p in ps),
             "decode_s": statistics.mean(p.get("decode_s", 0.0) for p in ps),
             "steps": statistics.mean(p["steps"] for p in ps), "configs": statistics.mean(p["configs"] for p in ps)}
            for n, ps in sorted(by.items())]

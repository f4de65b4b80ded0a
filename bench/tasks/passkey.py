"""Passkey retrieval: a random number hidden at several depths of filler text at several lengths (tokens, chat
template included), asked for at the end; greedy decoding; correct when the answer contains the number. Fillers:
``repeat`` (the classic "The grass is green. ..." lines) and ``prose`` (real English text); needle/question phrasings:
``passkey``, ``magic``, ``secret``."""

from __future__ import annotations

import random
import re
import time
from typing import Any

from bench.tasks.common import Harness

REPEAT_FILLER = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                 "There and back again."]

NEEDLES = {
    "passkey": ("The pass key is {key}. Remember it. {key} is the pass key.",
                "What is the pass key? Answer with the number only."),
    "magic": ("One of the special magic numbers is: {key}.",
              "What is the special magic number mentioned in the text above? Answer with the number only."),
    "secret": ("The secret code that opens the blue door is {key}.",
               "What is the secret code that opens the blue door? Reply with the code."),
}
INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will ask you about it afterwards.")


def chat_ids(tok, text: str) -> list[int]:
    """``text`` as the user's message in the model's chat template (or followed by "Answer:" without one)."""
    if tok.has_chat_template:
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True),
                          add_bos=False)
    return tok.encode(text + "\nAnswer:")


def build_prompt(tok, *, length: int, depth: float, filler: str, style: str, key: str, prose: list[str],
                 rng: random.Random) -> tuple[list[int], dict[str, Any]]:
    """Chat-templated prompt of about ``length`` tokens with the needle at ``depth`` of the filler."""
    needle, question = NEEDLES[style]
    needle = needle.format(key=key)
    overhead = len(chat_ids(tok, f"{INSTRUCTION}\n\n{needle}\n\n{question}"))
    room = length - overhead
    if room < 8:
        raise ValueError(f"passkey length {length} leaves no room for filler ({overhead} tokens of instructions)")
    pool = REPEAT_FILLER if filler == "repeat" else prose
    start = 0 if filler == "repeat" else rng.randrange(len(pool))
    chosen, used, i = [], 0, start
    while used < room:
        s = pool[i % len(pool)]
        n_tok = len(tok.encode(" " + s, add_bos=False))
        if used + n_tok > room and chosen:
            break
        chosen.append(s)
        used += n_tok
        i += 1
    # needle after the sentence whose cumulative share reaches depth
    cum, at = 0, 0
    counts = [len(tok.encode(" " + s, add_bos=False)) for s in chosen]
    target = depth * sum(counts)
    for j, c in enumerate(counts):
        if cum + c / 2 > target:
            break
        cum += c
        at = j + 1
    hay = chosen[:at] + [needle] + chosen[at:]
    text = f"{INSTRUCTION}\n\n{' '.join(hay)}\n\n{question}"
    ids = chat_ids(tok, text)
    return ids, {"needle_sentence": at, "sentences": len(chosen), "actual_depth": cum / max(1, sum(counts))}


def correct(answer: str, key: str) -> bool:
    return key in answer or key in re.sub(r"[\s,._'-]", "", answer)


def run(h: Harness, *, lengths: list[int], depths: list[float], trials: int, fillers: list[str], styles: list[str],
        key_digits: int, answer_tokens: int, prose: list[str], seed: int) -> list[dict[str, Any]]:
    """One row per (filler, style, length, depth, trial, configuration): the answer and whether it is correct (or
    why the configuration was skipped at that prompt length)."""
    tok = h.gen.tokenizer
    for s in styles:
        if s not in NEEDLES:
            raise SystemExit(f"--needle-style {s!r} is not one of {', '.join(NEEDLES)} or all")
    eos = set(tok.eos_ids)
    rows = []
    for filler in fillers:
        if filler == "prose" and not prose:
            print("[quality] no prose sentences: prose filler skipped")
            continue
        for style in styles:
            for length in lengths:
                for depth in depths:
                    for trial in range(trials):
                        rng = random.Random(f"{seed}-{filler}-{style}-{length}-{depth}-{trial}")
                        key = str(rng.randrange(10 ** (key_digits - 1), 10**key_digits))
                        ids, info = build_prompt(tok, length=length, depth=depth, filler=filler, style=style,
                                                 key=key, prose=prose, rng=rng)
                        t0 = time.perf_counter()
                        res = h.run(ids, steps=answer_tokens)
                        dt = time.perf_counter() - t0
                        answers = {}
                        for label, seq in zip(res.labels, res.tokens.tolist()):
                            c = h.config(label)
                            cut = next((k for k, x in enumerate(seq) if x in eos), len(seq))
                            answer = tok.decode(seq[:cut], skip_special_tokens=True).strip()
                            answers[label] = answer
                            rows.append({"filler": filler, "style": style, "length": length, "prompt_len": len(ids),
                                         "depth": depth, "actual_depth": round(info["actual_depth"], 3),
                                         "trial": trial, "key": key, "method": c.method, "budget": c.frac,
                                         "label": label, "slots": c.slots(len(ids)), "answer": answer,
                                         "correct": correct(answer, key)})
                        for label, why in res.skipped.items():
                            rows.append({"filler": filler, "style": style, "length": length, "depth": depth,
                                         "trial": trial, "label": label, "skipped": why})
                        n_ok = sum(correct(x, key) for x in answers.values())
                        print(f"[quality] passkey {filler}/{style} {len(ids)} tokens, depth {depth:g}, key {key}: "
                              f"{n_ok}/{len(answers)} correct ({dt:.1f}s); full answered "
                              f"{answers.get('full', '')[:40]!r}", flush=True)
                        if res.prefill_max_diff > 1e-3:
                            print(f"[quality] warning: prefill outputs differ across caches by "
                                  f"{res.prefill_max_diff:.2e}")
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per configuration overall and per (configuration, filler, length, depth) cell."""
    cells: dict[tuple, list[bool]] = {}
    overall: dict[str, list[bool]] = {}
    for r in rows:
        if "correct" not in r:
            continue
        cells.setdefault((r["label"], r["filler"], r["length"], r["depth"]), []).append(r["correct"])
        overall.setdefault(r["label"], []).append(r["correct"])
    return {"overall": {k: sum(v) / len(v) for k, v in overall.items()},
            "cells": [{"label": k[0], "filler": k[1], "length": k[2], "depth": k[3], "accuracy": sum(v) / len(v),
                       "n": len(v)} for k, v in cells.items()]}

"""Teacher-forced continuation: a real text's continuation of C tokens after a prompt of P tokens, mean NLL and top-1
agreement with the full cache over the decode positions (position 0 comes from the shared prefill and is excluded).

With ``attention_error`` (the harness's ``attn`` task, measured in the same pass): at every decode step and layer,
each row's attention output against that of a full cache kept alongside and fed the same row's q/k/v (the compressed
run's own hidden states, so the error is that of the attention over the compressed cache alone, not compounded across
layers): ``||out_c - out_f|| / ||out_f||`` over the row's heads, averaged over steps and samples, per layer."""

from __future__ import annotations

import math
import random
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from bench.tasks.common import Harness

MEASURED = ("mean over decode positions (continuation tokens 1..C-1) of the NLL; top-1 agreement with the full "
            "cache's argmax at the same positions; attention error per layer: ||out_c - out_f|| / ||out_f|| over a "
            "row's heads at each decode step, out_f from a full cache fed the same row's q/k/v, averaged over steps "
            "and samples")


def samples(tok, texts: list[dict[str, Any]], *, n: int, prompt_tokens: int, cont_tokens: int,
            seed: int) -> list[tuple[str, list[int]]]:
    """``n`` (text name, prompt + continuation ids) cut from the texts, shuffled by ``seed``."""
    need = prompt_tokens + cont_tokens
    out = []
    for t in texts:
        ids = tok.encode(t["text"], add_bos=False)
        k = (len(ids) - need) // need + 1 if len(ids) >= need else 0
        out += [(t["name"], ids[j * need : (j + 1) * need]) for j in range(k)]
    if not out:
        raise SystemExit(f"no text is {need} tokens long (--nll-prompt + --nll-cont); give a longer --text")
    random.Random(seed).shuffle(out)
    return out[:n]


def run(h: Harness, texts: list[dict[str, Any]], *, n_samples: int, prompt_tokens: int, cont_tokens: int,
        attention_error: bool, seed: int) -> dict[str, Any]:
    """Per configuration: mean NLL (and per sample), perplexity, top-1 agreement with the full cache, and the
    attention-output error per layer and its mean (with ``attention_error``)."""
    tok = h.gen.tokenizer
    picked = samples(tok, texts, n=n_samples, prompt_tokens=prompt_tokens, cont_tokens=cont_tokens, seed=seed)
    per: dict[str, dict[str, Any]] = {}
    bos = [tok.bos_id] if tok.bos_id is not None else []
    for si, (name, ids) in enumerate(picked):
        prompt, cont = bos + ids[:prompt_tokens], ids[prompt_tokens:]
        t0 = time.perf_counter()
        res = h.run(prompt, steps=len(cont), forced=cont, attention_error=attention_error)
        logits = res.logits  # (N, C, V)
        target = torch.tensor(cont)
        full_i = res.labels.index("full") if "full" in res.labels else None
        for i, label in enumerate(res.labels):
            c = h.config(label)
            lp = logits[i, 1:]  # decode positions only
            d = per.setdefault(label, {"method": c.method, "budget": c.frac, "nll": [], "agree": [], "attn": [],
                                       "slots": []})
            d["nll"].append(F.cross_entropy(lp, target[1:], reduction="mean").item())
            d["slots"].append(c.slots(len(prompt)))
            if full_i is not None:
                d["agree"].append((lp.argmax(-1) == logits[full_i, 1:].argmax(-1)).float().mean().item())
            if attention_error:
                d["attn"].append(res.attention_error[i].tolist())
        print(f"[quality] nll sample {si + 1}/{len(picked)} ({name}, prompt {len(prompt)}, continuation {len(cont)}, "
              f"{time.perf_counter() - t0:.1f}s): "
              + ", ".join(f"{lab} {per[lab]['nll'][-1]:.3f}" for lab in res.labels), flush=True)
        for label, why in res.skipped.items():
            per.setdefault(label, {"skipped": why})
    out = {}
    for label, d in per.items():
        if "skipped" in d:
            out[label] = d
            continue
        rec = {"method": d["method"], "budget": d["budget"], "nll": statistics.mean(d["nll"]),
               "nll_per_sample": d["nll"], "slots": d["slots"], "ppl": math.exp(statistics.mean(d["nll"])),
               "top1_agreement": statistics.mean(d["agree"]) if d["agree"] else None}
        if d["attn"]:
            layers = torch.tensor(d["attn"]).mean(0)
            rec["attn_rel_err_per_layer"] = layers.tolist()
            rec["attn_rel_err_mean"] = layers.mean().item()
        out[label] = rec
    return {"samples": [{"text": name, "prompt_tokens": prompt_tokens, "continuation_tokens": cont_tokens}
                        for name, _ in picked], "results": out, "measured": MEASURED}

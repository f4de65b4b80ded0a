"""Quality harness: passkey retrieval, teacher-forced NLL and top-1 agreement, and per-layer attention-output error of
compressed KV caches against the full cache, for methods x budgets.

    python bench/quality.py --model smollm2-135m --methods full,zeromerge,h2o,streaming,snapkv \
        --budgets 0.05,0.1,0.2 --quick --out out/quality

Budgets are fractions of each prompt's length (as the paper's throughput runs): a prompt of T tokens gets
``floor(frac * T)`` slots. ``full`` is run once per sample whatever the budgets.

How a sample is run: the weights are loaded once. For each sample, every (method, budget) configuration gets its own
cache (batch 1) per layer; the configurations sit in the rows of one batch behind a fan-out cache module per layer.
The prompt is prefilled once through the model: each layer hands the same q/k/v to every configuration's cache (a
cache's prefill output is plain causal attention whatever the method, which the harness checks), and each cache
scores and compresses the prompt its own way. Decoding then runs all configurations as rows of one batch through the
model's decode path: every row is independent, exactly as if run alone (zmzoo's batch rows are independent; the test
suite checks that the full-cache NLL equals ``Generator.score``'s).

Tasks:
- ``passkey``: a random number hidden at several depths of filler text at several lengths (tokens, chat template
  included), asked for at the end; greedy decoding; correct when the answer contains the number. Fillers: ``repeat``
  (the classic "The grass is green. ..." lines) and ``prose`` (real English text); needle/question phrasings:
  ``passkey``, ``magic``, ``secret``.
- ``nll``: a real text's continuation of C tokens teacher-forced after a prompt of P tokens: mean NLL and top-1
  agreement with the full cache over the decode positions (position 0 comes from the shared prefill and is excluded).
- ``attn`` (measured during the ``nll`` pass): at every decode step and layer, each row's attention output is compared
  to that of a full cache kept alongside and fed the same row's q/k/v (the compressed run's own hidden states, so the
  error is that of the attention over the compressed cache alone, not compounded across layers):
  ``||out_c - out_f|| / ||out_f||`` over the row's heads, averaged over steps and samples, per layer.

Texts: by default English prose that ships with Python: the language reference of ``pydoc_data.topics`` and the
history section of Python's LICENSE.txt, filtered to prose paragraphs (no indented code, no headings, few code
symbols). ``--text FILE`` (repeatable) uses your files instead. The output names the texts used.

Writes ``OUT/quality.json`` and PNGs (``passkey.png``, ``nll.png``, ``attn_error.png``); prints tables.
Settings: ``--quick`` is sized for a 2-core CPU with SmolLM2-135M (a few minutes). The full setting on a GPU:
``--lengths 1024,2048,4096,8000 --depths 0,0.25,0.5,0.75,1 --trials 3 --filler both --needle-style all
--nll-samples 8 --nll-prompt 4096 --nll-cont 256``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import random
import re
import statistics
import sys
import sysconfig
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zmzoo.environment import environment

# ---------------------------------------------------------------------------------------------------- texts
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

_CODE_CHARS = set("{}[]=<>_*#`|\\$@;~^")


def _prose_paragraphs(text: str) -> list[str]:
    """Prose paragraphs of a text: not indented (code examples, continuation lists), no heading underlines, ending
    like a sentence, mostly letters, few code symbols. Lines of a paragraph are joined with single spaces."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.split("\n")
        if not lines or not lines[0].strip():
            continue
        if lines[0][:1].isspace() or lines[0].lstrip().startswith((">>>", "...", "*", "-", "+", "|")):
            continue
        if any(re.fullmatch(r"\s*([*=~^\-#])\1{2,}\s*", ln) for ln in lines):
            continue
        para = " ".join(ln.strip() for ln in lines)
        para = re.sub(r"\s+", " ", para).strip()
        para = re.sub(r"(\w)- (\w)", r"\1-\2", para)  # words hyphenated across a line break
        if len(para) < 120 or not para.endswith((".", "!", "?")):
            continue
        letters = sum(c.isalpha() or c.isspace() for c in para)
        code = sum(c in _CODE_CHARS for c in para)
        if letters / len(para) < 0.88 or code / len(para) > 0.01:
            continue
        out.append(para)
    return out


def default_texts() -> list[dict[str, Any]]:
    """English prose shipped with Python: the language reference (pydoc_data.topics) and LICENSE.txt's history."""
    texts = []
    try:
        from pydoc_data.topics import topics

        paras = []
        for key in sorted(topics):
            paras += _prose_paragraphs(topics[key])
        texts.append({"name": "python-reference", "source": "pydoc_data.topics (the Python language reference, "
                      f"{len(topics)} sections), prose paragraphs only", "text": "\n\n".join(paras)})
    except ImportError:
        pass
    lic = Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt"
    if lic.is_file():
        raw = lic.read_text(encoding="utf-8", errors="replace")
        hist = raw.split("B. TERMS AND CONDITIONS")[0]
        paras = _prose_paragraphs(hist)
        if paras:
            texts.append({"name": "python-license-history", "source": f"{lic} (section A, history), prose paragraphs",
                          "text": "\n\n".join(paras)})
    if not texts:
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # importing this prints the Zen
            import this
        zen = "".join(this.d.get(c, c) for c in this.s)
        texts.append({"name": "zen-of-python", "source": "the this module", "text": zen})
    return texts


def readme_texts() -> list[dict[str, Any]]:
    """English prose from the READMEs (long descriptions) of the installed Python packages: a second, independent
    prose source (``--text readmes``), e.g. to check settings tuned on the default texts."""
    from importlib import metadata

    paras, names = [], []
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        got = _prose_paragraphs(body) if isinstance(body, str) else []
        if got:
            paras += got
            names.append(dist.metadata["Name"])
    if not paras:
        raise SystemExit("--text readmes: no installed package has a README with prose paragraphs")
    return [{"name": "package-readmes", "source": f"READMEs of {len(names)} installed packages ({', '.join(names)}), "
             "prose paragraphs only", "text": "\n\n".join(paras)}]


def load_texts(files: list[str] | None) -> list[dict[str, Any]]:
    if not files:
        return default_texts()
    texts = []
    for f in files:
        if f == "readmes":
            texts += readme_texts()
            continue
        p = Path(f)
        raw = p.read_text(encoding="utf-8", errors="replace")
        texts.append({"name": p.name, "source": str(p.resolve()), "text": re.sub(r"[ \t]+", " ", raw).strip()})
    return texts


def sentences(text: str) -> list[str]:
    out = []
    for para in re.split(r"\n\s*\n", text):
        out += [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", para.replace("\n", " ")) if s.strip()]
    return out


# ---------------------------------------------------------------------------------------------------- caches
@dataclass(frozen=True)
class Config:
    method: str  # a cache method, or "method:preset" (e.g. zeromerge:retrieval)
    frac: float | None  # None: full cache

    @property
    def label(self) -> str:
        return "full" if self.frac is None else f"{self.method}@{self.frac:g}"

    @property
    def cache_method(self) -> str:
        return self.method.split(":")[0]

    @property
    def preset(self) -> str | None:
        return self.method.split(":")[1] if ":" in self.method else None


class FanoutCache(nn.Module):
    """One layer's caches of several configurations, configuration i in batch row i, all fed the same prompt.

    ``prefill`` hands the prompt's q/k/v to every configuration (each scores and compresses it its own way) and
    returns the causal attention output (the same for every cache; the largest difference is kept in
    ``prefill_maxdiff``). ``decode`` runs row i through configuration i's cache. With a ``shadow`` full cache
    (batch = rows) each row's output is also compared with full attention over the same row's q/k/v history.
    """

    def __init__(self, caches: list[nn.Module], shadow: nn.Module | None):
        super().__init__()
        self.subs = nn.ModuleList(caches)
        self.shadow = shadow
        n = len(caches)
        dev = next((b.device for c in caches for b in c.buffers()), torch.device("cpu"))  # where the caches live
        self.register_buffer("err_sum", torch.zeros(n, dtype=torch.float64, device=dev), persistent=False)
        self.register_buffer("err_count", torch.zeros((), dtype=torch.float64, device=dev), persistent=False)
        self.prefill_maxdiff = 0.0

    def prefill(self, q: Tensor, k: Tensor, v: Tensor, row: int) -> Tensor:
        if row != 0:
            raise ValueError("FanoutCache takes the one prompt in row 0")
        outs = [c.prefill(q, k, v, 0) for c in self.subs]
        for o in outs[1:]:
            self.prefill_maxdiff = max(self.prefill_maxdiff, (o.float() - outs[0].float()).abs().max().item())
        if self.shadow is not None:
            t = k.shape[2]
            self.shadow.prefill(q, k, v, 0)
            self.shadow.k[1:, :, :t] = self.shadow.k[:1, :, :t]
            self.shadow.v[1:, :, :t] = self.shadow.v[:1, :, :t]
        return outs[0]

    # a configuration with a lookahead (zeromerge's setting) drafts tokens over the full prompt after prefill: the
    # draft's attention is full attention whichever configuration runs it, so the first pending one's output is used
    @property
    def lookahead(self) -> int:
        return max((getattr(c, "lookahead", 0) for c in self.subs), default=0)

    def pending_lookahead(self) -> int:
        return max((c.pending_lookahead() for c in self.subs if hasattr(c, "pending_lookahead")), default=0)

    def draft(self, q: Tensor, k: Tensor, v: Tensor, step: int) -> Tensor:
        outs = [c.draft(q, k, v, step) for c in self.subs
                if hasattr(c, "pending_lookahead") and step < c.pending_lookahead()]
        return outs[0]

    def finish_prefill(self) -> None:
        for c in self.subs:
            if hasattr(c, "finish_prefill"):
                c.finish_prefill()

    def decode(self, q: Tensor, k: Tensor, v: Tensor, pos: Tensor) -> Tensor:
        outs = [c.decode(q[i : i + 1], k[i : i + 1], v[i : i + 1], pos[i : i + 1]) for i, c in enumerate(self.subs)]
        out = torch.cat(outs, 0)  # (N, H, 1, D)
        if self.shadow is not None:
            ref = self.shadow.decode(q, k, v, pos).float()
            err = (out.float() - ref).flatten(1).norm(dim=1) / ref.flatten(1).norm(dim=1).clamp_min(1e-30)
            self.err_sum += err.double()
            self.err_count += 1
        return out


def build_fanout(base, configs: list[Config], prompt_len: int, max_seq_len: int, measure_attn: bool,
                 settings: dict[str, Any]) -> tuple[list[FanoutCache], list[Config], dict[str, str]]:
    """Per-layer fan-out caches for the configurations that are valid at this prompt length (the others are returned
    with their reasons)."""
    from zmzoo.cache import build_caches, resolve_cache_config

    a = base.args
    common = dict(n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim,
                  max_seq_len=max_seq_len, dtype=base.dtype, device=base.device, sliding_window=a.sliding_window,
                  backend=base.backend)
    per_config, kept, skipped = [], [], {}
    for c in configs:
        try:
            if c.frac is None:
                cfg = resolve_cache_config(max_seq_len=max_seq_len, method="full")
            else:
                budget = math.floor(c.frac * prompt_len)
                cfg = resolve_cache_config(max_seq_len=max_seq_len, method=c.cache_method, kv_budget=max(budget, 1),
                                           preset=c.preset, **settings.get(c.method, {}))
            per_config.append(build_caches(cfg, batch_size=1, **common))
            kept.append(c)
        except (ValueError, TypeError) as e:
            skipped[c.label] = str(e)
    shadows = build_caches(resolve_cache_config(max_seq_len=max_seq_len, method="full"), batch_size=len(kept),
                           **common) if measure_attn else [None] * a.n_layers
    layers = [FanoutCache([pc[i] for pc in per_config], shadows[i]) for i in range(a.n_layers)]
    return layers, kept, skipped


@torch.inference_mode()
def run_sample(base, configs: list[Config], prompt: list[int], *, steps: int, forced: list[int] | None = None,
               measure_attn: bool = False, settings: dict[str, Any] | None = None, decode_fn=None) -> dict[str, Any]:
    """Prefill ``prompt`` once into every configuration's cache, then decode ``steps`` tokens for all of them as
    batch rows: greedy when ``forced`` is None, else teacher-forced on ``forced`` (row logits at step i predict
    forced[i]; step 0 is the prefill's). Returns per-configuration tokens / fp32 logits and attention errors."""
    model = base.model
    t = len(prompt)
    max_seq_len = t + steps + 1
    layers, kept, skipped = build_fanout(base, configs, t, max_seq_len, measure_attn, settings or {})
    model.setup_caches(layers, max_seq_len)
    n = len(kept)
    dev = base.device
    logits0 = model.prefill(torch.tensor([prompt], device=dev), row=0)  # (1, V)
    logits = [logits0.float().expand(n, -1)]
    pos = torch.full((n,), t, dtype=torch.int64, device=dev)
    tok = logits0.argmax(-1).expand(n).contiguous()
    toks = [tok]
    step = decode_fn or model.decode
    for i in range(1, steps):
        inp = torch.full((n,), forced[i - 1], dtype=torch.int64, device=dev) if forced is not None else tok
        out = step(inp, pos)
        pos += 1
        logits.append(out.float())
        tok = out.argmax(-1)
        toks.append(tok)
    res: dict[str, Any] = {"configs": kept, "skipped": skipped, "prompt_len": t,
                           "tokens": torch.stack(toks, 1).cpu(),  # (N, steps)
                           "prefill_maxdiff": max(layer.prefill_maxdiff for layer in layers)}
    if forced is not None:
        res["logits"] = torch.stack(logits, 1).cpu()  # (N, steps, V)
    if measure_attn:
        cnt = layers[0].err_count.item()
        res["attn_err"] = torch.stack([layer.err_sum / max(cnt, 1) for layer in layers], 1).cpu()  # (N, L)
        res["attn_steps"] = cnt
    return res


# ---------------------------------------------------------------------------------------------------- tasks
def chat_ids(tok, text: str) -> list[int]:
    if tok.has_chat_template:
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True),
                          add_bos=False)
    return tok.encode(text + "\nAnswer:")


def build_passkey_prompt(tok, *, length: int, depth: float, filler: str, style: str, key: str,
                         prose: list[str], rng: random.Random) -> tuple[list[int], dict[str, Any]]:
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


def passkey_correct(answer: str, key: str) -> bool:
    return key in answer or key in re.sub(r"[\s,._'-]", "", answer)


def task_passkey(base, ns, configs: list[Config], prose: list[str]) -> list[dict[str, Any]]:
    tok = base.tokenizer
    rows = []
    fillers = ["repeat", "prose"] if ns.filler == "both" else [ns.filler]
    styles = list(NEEDLES) if ns.needle_style == "all" else ns.needle_style.split(",")
    for s in styles:
        if s not in NEEDLES:
            raise SystemExit(f"--needle-style {s!r} is not one of {', '.join(NEEDLES)} or all")
    eos = set(tok.eos_ids)
    for filler in fillers:
        if filler == "prose" and not prose:
            print("[quality] no prose sentences: prose filler skipped")
            continue
        for style in styles:
            for length in ns.lengths:
                for depth in ns.depths:
                    for trial in range(ns.trials):
                        rng = random.Random(f"{ns.seed}-{filler}-{style}-{length}-{depth}-{trial}")
                        key = str(rng.randrange(10 ** (ns.key_digits - 1), 10**ns.key_digits))
                        ids, info = build_passkey_prompt(tok, length=length, depth=depth, filler=filler, style=style,
                                                         key=key, prose=prose, rng=rng)
                        t0 = time.perf_counter()
                        res = run_sample(base, configs, ids, steps=ns.answer_tokens, settings=ns.settings,
                                         decode_fn=ns.decode_fn)
                        dt = time.perf_counter() - t0
                        answers = {}
                        for c, seq in zip(res["configs"], res["tokens"].tolist()):
                            cut = next((k for k, x in enumerate(seq) if x in eos), len(seq))
                            answer = tok.decode(seq[:cut], skip_special_tokens=True).strip()
                            answers[c.label] = answer
                            rows.append({"filler": filler, "style": style, "length": length, "prompt_len": len(ids),
                                         "depth": depth, "actual_depth": round(info["actual_depth"], 3),
                                         "trial": trial, "key": key, "method": c.method, "budget": c.frac,
                                         "label": c.label,
                                         "slots": None if c.frac is None else math.floor(c.frac * len(ids)),
                                         "answer": answer, "correct": passkey_correct(answer, key)})
                        for label, why in res["skipped"].items():
                            rows.append({"filler": filler, "style": style, "length": length, "depth": depth,
                                         "trial": trial, "label": label, "skipped": why})
                        n_ok = sum(passkey_correct(x, key) for x in answers.values())
                        print(f"[quality] passkey {filler}/{style} {len(ids)} tokens, depth {depth:g}, key {key}: "
                              f"{n_ok}/{len(answers)} correct ({dt:.1f}s); full answered "
                              f"{answers.get('full', '')[:40]!r}", flush=True)
                        if res["prefill_maxdiff"] > 1e-3:
                            print(f"[quality] warning: prefill outputs differ across caches by "
                                  f"{res['prefill_maxdiff']:.2e}")
    return rows


def task_nll(base, ns, configs: list[Config], texts: list[dict[str, Any]]) -> dict[str, Any]:
    """Teacher-forced NLL, top-1 agreement with the full cache, and per-layer attention error."""
    tok = base.tokenizer
    need = ns.nll_prompt + ns.nll_cont
    samples = []
    for t in texts:
        ids = tok.encode(t["text"], add_bos=False)
        n = max(0, (len(ids) - need) // need + 1) if len(ids) >= need else 0
        samples += [(t["name"], ids[j * need : (j + 1) * need]) for j in range(n)]
    if not samples:
        raise SystemExit(f"no text is {need} tokens long (--nll-prompt + --nll-cont); give a longer --text")
    rng = random.Random(ns.seed)
    rng.shuffle(samples)
    samples = samples[: ns.nll_samples]
    per: dict[str, dict[str, list]] = {}
    measure = "attn" in ns.tasks
    bos = [tok.bos_id] if tok.bos_id is not None else []
    for si, (name, ids) in enumerate(samples):
        prompt, cont = bos + ids[: ns.nll_prompt], ids[ns.nll_prompt :]
        t0 = time.perf_counter()
        res = run_sample(base, configs, prompt, steps=len(cont), forced=cont, measure_attn=measure,
                         settings=ns.settings, decode_fn=ns.decode_fn)
        logits = res["logits"]  # (N, C, V)
        target = torch.tensor(cont)
        labels = [c.label for c in res["configs"]]
        full_i = labels.index("full") if "full" in labels else None
        for i, c in enumerate(res["configs"]):
            lp = logits[i, 1:]  # decode positions only
            nll = F.cross_entropy(lp, target[1:], reduction="mean").item()
            d = per.setdefault(c.label, {"method": c.method, "budget": c.frac, "nll": [], "agree": [],
                                         "attn": [], "slots": []})
            d["nll"].append(nll)
            d["slots"].append(None if c.frac is None else math.floor(c.frac * len(prompt)))
            if full_i is not None:
                agree = (lp.argmax(-1) == logits[full_i, 1:].argmax(-1)).float().mean().item()
                d["agree"].append(agree)
            if measure:
                d["attn"].append(res["attn_err"][i].tolist())
        print(f"[quality] nll sample {si + 1}/{len(samples)} ({name}, prompt {len(prompt)}, continuation {len(cont)}, "
              f"{time.perf_counter() - t0:.1f}s): "
              + ", ".join(f"{lab} {per[lab]['nll'][-1]:.3f}" for lab in labels), flush=True)
        for label, why in res["skipped"].items():
            per.setdefault(label, {"skipped": why})
    out = {}
    for label, d in per.items():
        if "skipped" in d:
            out[label] = d
            continue
        rec = {"method": d["method"], "budget": d["budget"], "nll": statistics.mean(d["nll"]),
               "nll_per_sample": d["nll"], "slots": d["slots"],
               "ppl": math.exp(statistics.mean(d["nll"])),
               "top1_agreement": statistics.mean(d["agree"]) if d["agree"] else None}
        if d["attn"]:
            layers = torch.tensor(d["attn"]).mean(0)
            rec["attn_rel_err_per_layer"] = layers.tolist()
            rec["attn_rel_err_mean"] = layers.mean().item()
        out[label] = rec
    return {"samples": [{"text": name, "prompt_tokens": ns.nll_prompt, "continuation_tokens": ns.nll_cont}
                        for name, _ in samples], "results": out,
            "measured": "mean over decode positions (continuation tokens 1..C-1) of the NLL; top-1 agreement with "
                        "the full cache's argmax at the same positions; attention error per layer: "
                        "||out_c - out_f|| / ||out_f|| over a row's heads at each decode step, out_f from a full "
                        "cache fed the same row's q/k/v, averaged over steps and samples"}


# ---------------------------------------------------------------------------------------------------- output
def passkey_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
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


def print_tables(results: dict[str, Any], labels: list[str]) -> None:
    lw = max([18] + [len(lab) + 2 for lab in labels])  # label column width
    pk = results.get("passkey")
    if pk:
        summ = pk["summary"]
        lengths = sorted({c["length"] for c in summ["cells"]})
        fillers = sorted({c["filler"] for c in summ["cells"]})
        print("\npasskey accuracy (mean over depths, trials and needle styles)")
        head = f"{'config':<{lw}}" + "".join(f"{f[:6] + '/' + str(n):>13}" for f in fillers for n in lengths) + \
            f"{'overall':>9}"
        print(head)
        print("-" * len(head))
        for lab in labels:
            if lab not in summ["overall"]:
                continue
            line = f"{lab:<{lw}}"
            for f in fillers:
                for n in lengths:
                    cs = [c for c in summ["cells"] if c["label"] == lab and c["filler"] == f and c["length"] == n]
                    acc = sum(c["accuracy"] * c["n"] for c in cs) / max(1, sum(c["n"] for c in cs))
                    line += f"{acc:>13.2f}" if cs else f"{'-':>13}"
            print(line + f"{summ['overall'][lab]:>9.2f}")
    nl = results.get("nll")
    if nl:
        print(f"\nteacher-forced continuation ({len(nl['samples'])} samples; NLL over decode positions)")
        head = f"{'config':<{lw}}{'NLL':>8}{'ppl':>9}{'top-1 agree':>12}{'attn rel err':>13}"
        print(head)
        print("-" * len(head))
        for lab in labels:
            r = nl["results"].get(lab)
            if r is None:
                continue
            if "skipped" in r:
                print(f"{lab:<{lw}} skipped: {r['skipped'][:80]}")
                continue
            agree = f"{r['top1_agreement']:.3f}" if r.get("top1_agreement") is not None else "-"
            err = f"{r['attn_rel_err_mean']:.2e}" if r.get("attn_rel_err_mean") is not None else "-"
            print(f"{lab:<{lw}}{r['nll']:>8.3f}{r['ppl']:>9.2f}{agree:>12}{err:>13}")
        if any(r.get("attn_rel_err_per_layer") for r in nl["results"].values()):
            print("\nattention-output relative error per layer (rows: config; columns: layer)")
            for lab in labels:
                r = nl["results"].get(lab)
                if r and r.get("attn_rel_err_per_layer"):
                    print(f"{lab:<{lw}}" + " ".join(f"{x:.1e}" for x in r["attn_rel_err_per_layer"]))


def plot(results: dict[str, Any], out: Path, labels: list[str]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    pk = results.get("passkey")
    if pk and pk["summary"]["cells"]:
        cells = pk["summary"]["cells"]
        fillers = sorted({c["filler"] for c in cells})
        lengths = sorted({c["length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        labs = [lab for lab in labels if any(c["label"] == lab for c in cells)]
        fig, axes = plt.subplots(len(fillers), len(labs), figsize=(2.2 * len(labs) + 1, 2.2 * len(fillers) + 0.8),
                                 squeeze=False)
        for fi, f in enumerate(fillers):
            for li, lab in enumerate(labs):
                grid = torch.full((len(depths), len(lengths)), float("nan"))
                for c in cells:
                    if c["label"] == lab and c["filler"] == f:
                        grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
                ax = axes[fi][li]
                ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
                for yi in range(len(depths)):
                    for xi in range(len(lengths)):
                        if not math.isnan(grid[yi, xi].item()):
                            ax.text(xi, yi, f"{grid[yi, xi].item():.2f}", ha="center", va="center", fontsize=7)
                ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=7)
                ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
                ax.set_title(f"{lab}\n{f}", fontsize=8)
                if li == 0:
                    ax.set_ylabel("needle depth")
                if fi == len(fillers) - 1:
                    ax.set_xlabel("length (tokens)", fontsize=7)
        fig.suptitle(f"passkey accuracy: {results['config']['model']}", fontsize=10)
        fig.tight_layout()
        fig.savefig(out / "passkey.png", dpi=100)
        plt.close(fig)
        written.append("passkey.png")
    nl = results.get("nll")
    if nl:
        res = {k: v for k, v in nl["results"].items() if "skipped" not in v}
        methods = sorted({v["method"] for v in res.values() if v["budget"] is not None})
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for m in methods:
            pts = sorted((v["budget"], v) for v in res.values() if v["method"] == m)
            axes[0].plot([b for b, _ in pts], [v["nll"] for _, v in pts], marker="o", label=m)
            if all(v.get("top1_agreement") is not None for _, v in pts):
                axes[1].plot([b for b, _ in pts], [v["top1_agreement"] for _, v in pts], marker="o", label=m)
        if "full" in res:
            axes[0].axhline(res["full"]["nll"], color="k", ls="--", label="full")
            axes[1].axhline(1.0, color="k", ls="--", label="full")
        axes[0].set(xlabel="budget (fraction of prompt)", ylabel="NLL (nats/token)", title="teacher-forced NLL")
        axes[1].set(xlabel="budget (fraction of prompt)", ylabel="top-1 agreement", title="agreement with full")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "nll.png", dpi=100)
        plt.close(fig)
        written.append("nll.png")
        with_attn = {k: v for k, v in res.items() if v.get("attn_rel_err_per_layer") and v["budget"] is not None}
        if with_attn:
            fig, axes = plt.subplots(1, 2, figsize=(11, 4))
            for lab in labels:
                v = with_attn.get(lab)
                if v:
                    style = "-" if v["method"] == "zeromerge" else "--"
                    axes[0].plot(v["attn_rel_err_per_layer"], style, label=lab)
            for m in methods:
                pts = sorted((v["budget"], v["attn_rel_err_mean"]) for v in with_attn.values() if v["method"] == m)
                axes[1].plot([b for b, _ in pts], [e for _, e in pts], marker="o", label=m)
            axes[0].set(xlabel="layer", ylabel="relative error", yscale="log", title="attention output error per layer")
            axes[1].set(xlabel="budget (fraction of prompt)", ylabel="mean relative error", yscale="log",
                        title="merge vs eviction (mean over layers)")
            for ax in axes:
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out / "attn_error.png", dpi=100)
            plt.close(fig)
            written.append("attn_error.png")
    return written


# ---------------------------------------------------------------------------------------------------- main
QUICK = dict(lengths="512,1024", depths="0,0.5,1", trials=1, filler="both", needle_style="passkey", budgets="0.1,0.2",
             nll_samples=1, nll_prompt=768, nll_cont=48, answer_tokens=12)
DEFAULTS = dict(lengths="1024,2048,4096", depths="0,0.25,0.5,0.75,1", trials=2, filler="both", needle_style="passkey",
                budgets="0.05,0.1,0.2", nll_samples=4, nll_prompt=2048, nll_cont=128, answer_tokens=16)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/quality.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="zmzoo model name, path or .gguf (needs a tokenizer)")
    p.add_argument("--weights", default="pretrained", choices=["pretrained", "random"])
    p.add_argument("--methods", default="full,zeromerge,h2o,streaming,snapkv")
    p.add_argument("--budgets", help=f"fractions of the prompt length (default {DEFAULTS['budgets']}; quick "
                                     f"{QUICK['budgets']})")
    p.add_argument("--tasks", default="passkey,nll,attn", help="passkey, nll, attn (attn runs with nll)")
    p.add_argument("--quick", action="store_true", help="a setting that finishes in minutes on a 2-core CPU")
    p.add_argument("--lengths", help="passkey prompt lengths in tokens")
    p.add_argument("--depths", help="needle depths in [0, 1]")
    p.add_argument("--trials", type=int, help="passkey trials (keys) per cell")
    p.add_argument("--filler", choices=["repeat", "prose", "both"])
    p.add_argument("--needle-style", help=f"comma-separated of {', '.join(NEEDLES)}, or all")
    p.add_argument("--key-digits", type=int, default=5)
    p.add_argument("--answer-tokens", type=int, help="greedy tokens generated for the passkey answer")
    p.add_argument("--text", action="append",
                   help="a text file for the prose filler and the NLL task (repeatable); 'readmes': the installed "
                        "packages' READMEs")
    p.add_argument("--nll-samples", type=int)
    p.add_argument("--nll-prompt", type=int, help="NLL prompt tokens")
    p.add_argument("--nll-cont", type=int, help="NLL continuation tokens")
    p.add_argument("--cache-setting", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a cache setting for one method, e.g. zeromerge.tail=0.5 (repeatable)")
    p.add_argument("--device")
    p.add_argument("--dtype", help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--ops", default="auto", choices=["auto", "torch", "triton"])
    p.add_argument("--compile", default="none", help="none (eager decode, default), auto, or a backend name")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/quality")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _setting(kv: str) -> tuple[str, str, Any]:
    key, _, v = kv.partition("=")
    method, _, name = key.partition(".")
    if not name:
        raise SystemExit(f"--cache-setting {kv!r}: write METHOD.KEY=VALUE, e.g. zeromerge.tail=0.5")
    for conv in (int, float):
        try:
            return method, name, conv(v)
        except ValueError:
            pass
    return method, name, {"none": None, "true": True, "false": False}.get(v.lower(), v)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    t_all = time.perf_counter()
    if ns.threads:
        torch.set_num_threads(ns.threads)
    preset = QUICK if ns.quick else DEFAULTS
    for k, v in preset.items():
        if getattr(ns, k) is None:
            setattr(ns, k, v)
    ns.lengths = [int(x) for x in str(ns.lengths).split(",") if x]
    ns.depths = [float(x) for x in str(ns.depths).split(",") if x]
    ns.budgets = [float(x) for x in str(ns.budgets).split(",") if x]
    ns.methods = [m for m in ns.methods.split(",") if m]
    ns.tasks = [t for t in ns.tasks.split(",") if t]
    for b in ns.budgets:
        if not 0 < b < 1:
            raise SystemExit(f"--budgets {b}: a budget is a fraction of the prompt in (0, 1)")
    ns.settings = {}
    for s in ns.cache_setting:
        m, k, v = _setting(s)
        ns.settings.setdefault(m, {})[k] = v
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)

    import zmzoo
    from zmzoo.loading import default_device_dtype
    from zmzoo.ops import resolve_backend

    device, dtype = default_device_dtype(ns.device, ns.dtype)
    backend = resolve_backend(ns.ops, device)
    t0 = time.perf_counter()
    base = zmzoo.load(ns.model, weights=ns.weights, method="full", device=device, dtype=dtype, compile=False,
                      max_seq_len=64, ops=backend, seed=ns.seed)
    if base.tokenizer is None:
        raise SystemExit(f"{ns.model} has no tokenizer: the quality harness needs text (use a checkpoint with one)")
    a = base.args
    print(f"[quality] {a.name}: {a.n_layers} layers, {a.n_heads}/{a.n_kv_heads} heads, context "
          f"{a.max_position_embeddings}; {str(dtype).replace('torch.', '')} on {device}, ops={backend}, threads "
          f"{torch.get_num_threads()}; loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    too_long = [n for n in ns.lengths if n > a.max_position_embeddings]
    if too_long:
        print(f"[quality] warning: lengths {too_long} exceed {a.name}'s context window {a.max_position_embeddings}")

    configs = [Config("full", None)] if "full" in ns.methods else []
    configs += [Config(m, b) for m in ns.methods if m != "full" for b in ns.budgets]
    labels = [c.label for c in configs]
    if ns.compile == "none":
        ns.decode_fn = None
    else:
        mode = "reduce-overhead" if device.type == "cuda" and ns.compile == "auto" else None
        backend_c = "inductor" if ns.compile == "auto" else ns.compile
        ns.decode_fn = torch.compile(base.model.decode, fullgraph=True, mode=mode, backend=backend_c)

    # ops=auto on CUDA: fall back to the torch references when the Triton kernels fail
    if backend == "triton" and ns.ops == "auto":
        try:
            run_sample(base, configs, list(range(1, 41)), steps=4, settings=ns.settings, measure_attn=True,
                       decode_fn=ns.decode_fn)
        except Exception as e:
            print(f"[quality] ops=auto: Triton ops failed ({type(e).__name__}: {str(e)[:120]}); using ops=torch")
            backend = base.backend = "torch"

    texts = load_texts(ns.text)
    tok = base.tokenizer
    prose = [s for t in texts for s in sentences(t["text"]) if 20 <= len(s) <= 400]
    text_info = [{"name": t["name"], "source": t["source"], "chars": len(t["text"]),
                  "tokens": len(tok.encode(t["text"], add_bos=False))} for t in texts]
    print("[quality] texts: " + "; ".join(f"{t['name']} ({t['tokens']} tokens: {t['source']})" for t in text_info))

    results: dict[str, Any] = {
        "env": {**environment(), "device": str(device), "dtype": str(dtype).replace("torch.", ""), "ops": backend,
                "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])])},
        "config": {"model": a.name, "weights": ns.weights, "methods": ns.methods, "budgets": ns.budgets,
                   "budget_unit": "fraction of each prompt's length (slots = floor(frac * prompt tokens))",
                   "configs": labels, "tasks": ns.tasks, "quick": ns.quick, "lengths": ns.lengths,
                   "depths": ns.depths, "trials": ns.trials, "filler": ns.filler, "needle_style": ns.needle_style,
                   "key_digits": ns.key_digits, "answer_tokens": ns.answer_tokens, "nll_samples": ns.nll_samples,
                   "nll_prompt": ns.nll_prompt, "nll_cont": ns.nll_cont, "cache_settings": ns.settings,
                   "compile": ns.compile, "seed": ns.seed},
        "texts": text_info,
    }
    try:
        if "passkey" in ns.tasks:
            t0 = time.perf_counter()
            rows = task_passkey(base, ns, configs, prose)
            results["passkey"] = {"rows": rows, "summary": passkey_summary(rows), "seconds": time.perf_counter() - t0}
            # written now as well: a run stopped during the NLL pass (a time-limited GPU lease) keeps its passkey table
            (out / "quality.json").write_text(json.dumps(results, indent=1, default=str))
        if "nll" in ns.tasks or "attn" in ns.tasks:
            t0 = time.perf_counter()
            results["nll"] = task_nll(base, ns, configs, texts)
            results["nll"]["seconds"] = time.perf_counter() - t0
    except Exception:
        traceback.print_exc()
        results["error"] = traceback.format_exc(limit=3)
    results["wall_s"] = time.perf_counter() - t_all
    print_tables(results, labels)
    (out / "quality.json").write_text(json.dumps(results, indent=1, default=str))
    written = [] if ns.no_plot else plot(results, out, labels)
    print(f"\n[quality] wall time {results['wall_s']:.1f}s; wrote {out / 'quality.json'}"
          + "".join(f", {out / w}" for w in written))
    return 1 if "error" in results else 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality harness: passkey retrieval, RULER's synthetic tasks, teacher-forced NLL and top-1 agreement, and per-layer
attention-output error of compressed KV caches against the full cache, for methods x budgets.

    python -m bench.quality --model smollm2-135m --methods full,zeromerge,h2o,streaming,snapkv \
        --budgets 0.05,0.1,0.2 --quick --out out/quality
    python -m bench.quality --tasks ruler --ruler-tasks all --lengths 1024,2048,4096,8192 --budgets 0.05,0.1,0.2 \
        --methods full,zeromerge,zeromerge:retrieval,h2o,snapkv,streaming,tova,knorm --ruler-samples 4 \
        --out out/ruler --resume

(``python -m zmzoo eval ...`` runs the same from a source checkout.) Budgets are fractions of each prompt's length (as
the paper's throughput runs): a prompt of T tokens gets ``floor(frac * T)`` slots. ``full`` is run once per sample
whatever the budgets.

How a sample is run: the weights are loaded once (``zmzoo.load``). For each prompt, every (method, budget)
configuration runs side by side through ``zmzoo.compare_caches``: one prefill hands each layer's q/k/v to every
configuration's cache, then all configurations decode as the rows of one batch, each row exactly as if run alone
(tests/test_compare.py and tests/test_bench.py check it against ``Generator.with_cache(...).score``). A configuration
that is invalid at a prompt's length (a budget below tail + dense) is reported as skipped there.

Tasks (``bench/tasks/``, one module each):
- ``passkey`` (``bench.tasks.passkey``): a random number hidden at several depths of filler text at several lengths
  (tokens, chat template included), asked for at the end; greedy decoding; correct when the answer contains the
  number. Fillers: ``repeat`` (the classic "The grass is green. ..." lines) and ``prose`` (real English text);
  needle/question phrasings: ``passkey``, ``magic``, ``secret``.
- ``ruler`` (``bench.tasks.ruler``, not run by default): RULER's 11 synthetic tasks (``bench/ruler.py``:
  niah_single_1/2/3, niah_multikey_1/2/3, niah_multivalue, niah_multiquery, vt, cwe, fwe; ``--ruler-tasks``, default
  all), generated offline at each of ``--lengths`` (``--ruler-length total``, the default: RULER's max_seq_length,
  the templated prompt plus the task's max_new_tokens, so 8192 fits SmolLM2's window; ``prompt``: prompt + answer
  prefix, no template, as bench/ruler.py's --length), ``--ruler-samples`` seeds each from ``--seed`` on; greedy up to
  the task's max_new_tokens (or every row's eos); RULER's string_match_all; budgets are fractions of the prompt fed.
  The essay haystack and the word lists come from installed prose (``--ruler-prose``; the JSON names it). Rows per
  sample and configuration; mean scores (0-100) per configuration x length x task and per configuration x length over
  tasks; ``ruler.png`` (score against length, one panel per budget, the full cache on each).
- ``nll`` (``bench.tasks.nll``): a real text's continuation of C tokens teacher-forced after a prompt of P tokens:
  mean NLL and top-1 agreement with the full cache over the decode positions (position 0 comes from the shared
  prefill and is excluded).
- ``attn`` (measured during the ``nll`` pass): at every decode step and layer, each row's attention output is compared
  to that of a full cache kept alongside and fed the same row's q/k/v (the compressed run's own hidden states, so the
  error is that of the attention over the compressed cache alone, not compounded across layers):
  ``||out_c - out_f|| / ||out_f||`` over the row's heads, averaged over steps and samples, per layer.

Kernels: ``--ops`` is ``zmzoo.load``'s (auto: Triton on CUDA). If they fail, the run fails and says why (``error`` in
the JSON, exit status 1); nothing falls back to other kernels. ``env.ops`` in the JSON is the backend that ran.

Texts: by default English prose that ships with Python: the language reference of ``pydoc_data.topics`` and the
history section of Python's LICENSE.txt, filtered to prose paragraphs (no indented code, no headings, few code
symbols). ``--text FILE`` (repeatable) uses your files instead. The output names the texts used.

Parallel runs: ``--merge A B ...`` (files or folders of ``quality.json``; no model is loaded) merges the RULER results
of runs that measured disjoint samples the same way (e.g. one process per task and length, as ``bench/h200.sh``'s
``ruler`` stage runs them) into ``OUT/quality.json``, its tables and ``ruler.png``; parts measured otherwise (model,
dtype, ops, cache settings, prose) or overlapping are refused.

Writes ``OUT/quality.json`` and PNGs (``passkey.png``, ``ruler.png``, ``nll.png``, ``attn_error.png``); prints tables.
``quality.json`` is rewritten (whole, through a temporary file: never half written) after the passkey task, after
every RULER sample and at the end, so an interrupted run keeps what it measured. ``--resume`` reads the RULER rows of
``OUT/quality.json`` (same model, weights, dtype, device type, ops, cache settings, prose and --ruler-length, else it
refuses) and runs
only the (task, length, seed, configuration) it lacks: an interrupted run goes on, and one with more methods,
budgets, lengths or samples measures only what is new (rows of configurations not in this run are carried over). The
file's other tasks are replaced by this run's.
Settings: ``--quick`` is sized for a 2-core CPU with SmolLM2-135M (a few minutes). The full setting on a GPU:
``--lengths 1024,2048,4096,8000 --depths 0,0.25,0.5,0.75,1 --trials 3 --filler both --needle-style all
--nll-samples 8 --nll-prompt 4096 --nll-cont 256``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

try:
    from bench import ruler
    from bench.plots import quality_plots
    from bench.tasks import nll, passkey
    from bench.tasks import ruler as ruler_task
    from bench.tasks.common import Config, Harness
    from bench.tasks.texts import load_texts, prose_sentences
    from bench.timing import run_env
except ModuleNotFoundError as e:  # `python bench/quality.py` puts bench/, not the checkout's root, on the path
    if e.name != "bench":
        raise
    raise SystemExit("bench/quality.py is a module of the bench package: run `python -m bench.quality ...` from the "
                     "repository's root (or `python -m zmzoo eval ...`)") from None

PROG = "python -m bench.quality"


# ---------------------------------------------------------------------------------------------------- output
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
    rl = results.get("ruler")
    if rl and rl["summary"]["by_length"]:
        print_ruler(rl, labels, lw)
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



def print_ruler(rl: dict[str, Any], labels: list[str], lw: int) -> None:
    """RULER's tables: configurations x lengths (mean over tasks), then configurations x tasks at each length."""
    summ = rl["summary"]
    lengths = sorted({b["length"] for b in summ["by_length"]})
    by = {(b["label"], b["length"]): b for b in summ["by_length"]}
    n = {(c["label"], c["length"], c["task"]): c for c in summ["cells"]}
    samples = max((c["n"] for c in summ["cells"]), default=0)
    print(f"\nRULER ({len(rl['tasks'])} tasks, up to {samples} sample(s) each; score 0-100, mean over tasks; "
          f"* = some tasks missing)")
    head = f"{'config':<{lw}}" + "".join(f"{n_:>9}" for n_ in lengths) + f"{'mean':>9}"
    print(head)
    print("-" * len(head))
    labels = labels + [lab for lab in summ["overall"] if lab not in labels]  # carried over by --resume
    for lab in labels:
        if lab not in summ["overall"]:
            continue
        line = f"{lab:<{lw}}"
        for length in lengths:
            b = by.get((lab, length))
            line += f"{b['score']:>8.1f}{' ' if b['complete'] else '*'}" if b else f"{'-':>9}"
        print(line + f"{summ['overall'][lab]:>9.1f}")
    tasks = [t for t in ruler.TASKS if any(c["task"] == t for c in summ["cells"])]
    for length in lengths:
        print(f"\nRULER per task at length {length} (score 0-100, mean over samples)")
        head = f"{'config':<{lw}}" + "".join(f"{ruler_task.SHORT.get(t, t):>6}" for t in tasks) + f"{'mean':>7}"
        print(head)
        print("-" * len(head))
        for lab in labels:
            if (lab, length) not in by:
                continue
            line = f"{lab:<{lw}}"
            for t in tasks:
                c = n.get((lab, length, t))
                line += f"{c['score']:>6.0f}" if c else f"{'-':>6}"
            print(line + f"{by[lab, length]['score']:>7.1f}")
    print("tasks: " + ", ".join(f"{ruler_task.SHORT.get(t, t)} = {t}" for t in tasks))
    skipped = sorted({(r["label"], r["length"]) for r in rl["rows"] if "skipped" in r})
    if skipped:
        print("skipped (invalid at that length): " + ", ".join(f"{lab}@{n_}" for lab, n_ in skipped))
    for t in rl.get("timing", []):
        print(f"length {t['length']}: {t['samples']} sample(s), {t['seconds']:.1f}s each (prefill "
              f"{t['prefill_s']:.1f}s, {t['steps']:.0f} decode steps {t['decode_s']:.1f}s) with {t['configs']:.0f} "
              f"configurations")
    errors = sorted({(r["task"], r["length"], r["error"]) for r in rl["rows"] if "error" in r})
    for t, n_, e in errors:
        print(f"not generated: {t} at {n_}: {e}")


# ---------------------------------------------------------------------------------------------------- main
QUICK = dict(lengths="512,1024", depths="0,0.5,1", trials=1, filler="both", needle_style="passkey", budgets="0.1,0.2",
             nll_samples=1, nll_prompt=768, nll_cont=48, answer_tokens=12, ruler_samples=1)
DEFAULTS = dict(lengths="1024,2048,4096", depths="0,0.25,0.5,0.75,1", trials=2, filler="both", needle_style="passkey",
                budgets="0.05,0.1,0.2", nll_samples=4, nll_prompt=2048, nll_cont=128, answer_tokens=16, ruler_samples=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="zmzoo model name, path or .gguf (needs a tokenizer)")
    p.add_argument("--weights", default="pretrained", choices=["pretrained", "random"])
    p.add_argument("--methods", default="full,zeromerge,h2o,streaming,snapkv")
    p.add_argument("--budgets", help=f"fractions of the prompt length (default {DEFAULTS['budgets']}; quick "
                                     f"{QUICK['budgets']})")
    p.add_argument("--tasks", default="passkey,nll,attn", help="comma-separated of passkey, ruler, nll, attn (attn "
                                                                "runs with nll)")
    p.add_argument("--quick", action="store_true", help="a setting that finishes in minutes on a 2-core CPU")
    p.add_argument("--lengths", help="prompt lengths in tokens (passkey; ruler: see --ruler-length)")
    p.add_argument("--depths", help="needle depths in [0, 1]")
    p.add_argument("--trials", type=int, help="passkey trials (keys) per cell")
    p.add_argument("--filler", choices=["repeat", "prose", "both"])
    p.add_argument("--needle-style", help=f"comma-separated of {', '.join(passkey.NEEDLES)}, or all")
    p.add_argument("--key-digits", type=int, default=5)
    p.add_argument("--answer-tokens", type=int, help="greedy tokens generated for the passkey answer")
    p.add_argument("--text", action="append",
                   help="a text file for the prose filler and the NLL task (repeatable); 'readmes': the installed "
                        "packages' READMEs")
    p.add_argument("--ruler-tasks", default="all", help=f"comma-separated of {', '.join(ruler.TASKS)} (or their short "
                                                         f"names {', '.join(ruler_task.SHORT.values())}), or all")
    p.add_argument("--ruler-samples", type=int, help=f"samples (seeds) per RULER task and length (default "
                                                     f"{DEFAULTS['ruler_samples']}; quick {QUICK['ruler_samples']})")
    p.add_argument("--ruler-prose", default="installed", choices=ruler.PROSE_SOURCES,
                   help="prose of the RULER essay haystacks and word lists (bench/ruler.py)")
    p.add_argument("--ruler-length", default="total", choices=ruler_task.CONVENTIONS,
                   help="how a RULER length is read: total (RULER's max_seq_length: the templated prompt plus the "
                        "task's max_new_tokens; default) or prompt (bench/ruler.py's: prompt + answer prefix)")
    p.add_argument("--resume", action="store_true",
                   help="keep the RULER rows of OUT/quality.json and run only the samples and configurations missing")
    p.add_argument("--merge", action="extend", nargs="+", metavar="QUALITY_JSON",
                   help="no model loaded: the RULER results of these files (runs of the same measurement "
                        "over disjoint samples, e.g. one per task in parallel) merged into OUT/quality.json, with "
                        "its tables and plot")
    p.add_argument("--nll-samples", type=int)
    p.add_argument("--nll-prompt", type=int, help="NLL prompt tokens")
    p.add_argument("--nll-cont", type=int, help="NLL continuation tokens")
    p.add_argument("--cache-setting", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a cache setting for one method, e.g. zeromerge.tail=0.5 (repeatable)")
    p.add_argument("--device")
    p.add_argument("--dtype", help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--ops", default="auto", choices=["auto", "torch", "triton"],
                   help="zmzoo.load's ops: auto = Triton on CUDA, the torch references elsewhere (kernels that fail "
                        "fail the run: no fallback)")
    p.add_argument("--compile", default="none", help="none (eager decode, default), auto, or a backend name")
    p.add_argument("--quantize", default="auto", choices=["auto", "none", "int8", "int4", "gguf"],
                   help="zmzoo.load's quantize (docs/quantization.md): auto keeps a GGUF's quantization on CUDA")
    p.add_argument("--act-quant", default="none", choices=["none", "int8"],
                   help="zmzoo.load's act_quant: int8 quantizes the quantized products' activations (W8A8 / W4A8)")
    p.add_argument("--group-size", type=int, help="int4 columns per scale: 32, 64 (default) or 128")
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


def write_json(path: Path, data: dict[str, Any]) -> None:
    """``path`` replaced whole (written beside it, then renamed): a run killed while writing leaves the last one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def resumed_ruler(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """``--resume``: the RULER result in ``path`` (None when there is none), if it was measured as this run measures
    (``fingerprint``: model, weights, dtype, device type, ops, cache settings, prose, length convention); else the
    run stops."""
    if not path.is_file():
        print(f"[quality] --resume: no {path} yet, nothing to resume")
        return None
    old = json.loads(path.read_text()).get("ruler")
    if not old:
        print(f"[quality] --resume: {path} has no RULER results, nothing to resume")
        return None
    if old.get("fingerprint") != fingerprint:
        diff = {k: (old.get("fingerprint", {}).get(k), v) for k, v in fingerprint.items()
                if old.get("fingerprint", {}).get(k) != v}
        raise SystemExit(f"--resume: {path}'s RULER results were measured otherwise (then, now: {diff}); use "
                         f"another --out")
    n = sum("score" in r or "skipped" in r for r in old["rows"])
    print(f"[quality] --resume: {n} RULER rows of {path} kept", flush=True)
    return old


def compile_arg(value: str) -> bool | str:
    """``--compile``: none (eager), auto (inductor; CUDA graphs on CUDA) or a torch.compile backend name."""
    return {"none": False, "auto": True}.get(value, value)


def merge_files(paths: list[str], out: Path, argv: list[str], plot: bool = True) -> int:
    """``--merge``: the RULER results of ``paths`` (``quality.json`` files, or folders holding one) as one result in
    ``out/quality.json``; the first file's environment and settings, the parts' commands in ``merged_from``."""
    parts = []
    for p in paths:
        f = Path(p) / "quality.json" if Path(p).is_dir() else Path(p)
        d = json.loads(f.read_text())
        if not d.get("ruler"):
            raise SystemExit(f"--merge {f}: no RULER results in it")
        if d.get("error"):
            print(f"[quality] --merge {f}: that run failed ({d['error'].splitlines()[0]}); its rows are kept")
        parts.append((f, d))
    labels = list(dict.fromkeys(lab for _, d in parts for lab in d["config"]["configs"]))
    try:
        merged = ruler_task.merge([d["ruler"] for _, d in parts], labels)
    except ValueError as e:
        raise SystemExit(f"--{e}") from None
    first = parts[0][1]
    results = {"env": {**first["env"], "merged_by": " ".join([PROG, *argv])},
               "config": {**first["config"], "configs": labels, "tasks": ["ruler"], "ruler_tasks": merged["tasks"],
                          "lengths": merged["lengths"]},
               "merged_from": [{"file": str(f), "command": d["env"].get("command"), "wall_s": d.get("wall_s"),
                                "complete": d["ruler"].get("complete"), "error": d.get("error")} for f, d in parts],
               "ruler": merged, "wall_s": max(d.get("wall_s", 0.0) for _, d in parts)}
    out.mkdir(parents=True, exist_ok=True)
    print_tables(results, labels)
    write_json(out / "quality.json", results)
    written = quality_plots(results, out, labels) if plot else []
    print(f"\n[quality] merged {len(parts)} files; wrote {out / 'quality.json'}"
          + "".join(f", {out / w}" for w in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ns = build_parser().parse_args(argv)
    if ns.merge:
        return merge_files(ns.merge, Path(ns.out), argv, plot=not ns.no_plot)
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
    unknown = sorted(set(ns.tasks) - {"passkey", "ruler", "nll", "attn"})
    if unknown:
        raise SystemExit(f"--tasks {', '.join(unknown)}: the tasks are passkey, ruler, nll, attn")
    ns.ruler_tasks = ruler_task.tasks_arg(ns.ruler_tasks)
    for b in ns.budgets:
        if not 0 < b < 1:
            raise SystemExit(f"--budgets {b}: a budget is a fraction of the prompt in (0, 1)")
    ns.settings = {}
    for s in ns.cache_setting:
        m, k, v = _setting(s)
        ns.settings.setdefault(m, {})[k] = v
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)

    configs = [Config("full", None)] if "full" in ns.methods else []
    configs += [Config(m, b) for m in ns.methods if m != "full" for b in ns.budgets]
    harness = Harness(None, configs, ns.settings, compile_arg(ns.compile))
    harness.check()
    labels = harness.labels

    import zmzoo

    t0 = time.perf_counter()
    gen = zmzoo.load(ns.model, weights=ns.weights, method="full", device=ns.device, dtype=ns.dtype, compile=False,
                     max_seq_len=64, ops=ns.ops, seed=ns.seed, quantize=None if ns.quantize == "none" else ns.quantize,
                     group_size=ns.group_size, act_quant=None if ns.act_quant == "none" else ns.act_quant)
    if gen.tokenizer is None:
        raise SystemExit(f"{ns.model} has no tokenizer: the quality harness needs text (use a checkpoint with one)")
    harness.gen = gen
    a = gen.args
    print(f"[quality] {a.name}: {a.n_layers} layers, {a.n_heads}/{a.n_kv_heads} heads, context "
          f"{a.max_position_embeddings}; {str(gen.dtype).replace('torch.', '')} on {gen.device}, ops={gen.backend}, "
          f"weights {gen.model.quantization or 'not quantized'}, "
          f"threads {torch.get_num_threads()}; loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    too_long = [n for n in ns.lengths if n > a.max_position_embeddings]
    if too_long:
        print(f"[quality] warning: lengths {too_long} exceed {a.name}'s context window {a.max_position_embeddings}")

    texts = load_texts(ns.text)
    tok = gen.tokenizer
    prose = prose_sentences(texts)
    text_info = [{"name": t["name"], "source": t["source"], "chars": len(t["text"]),
                  "tokens": len(tok.encode(t["text"], add_bos=False))} for t in texts]
    print("[quality] texts: " + "; ".join(f"{t['name']} ({t['tokens']} tokens: {t['source']})" for t in text_info))

    results: dict[str, Any] = {
        "env": run_env(device=gen.device, dtype=gen.dtype, ops=gen.backend, prog=PROG, argv=argv),
        "config": {"model": a.name, "weights": ns.weights, "methods": ns.methods, "budgets": ns.budgets,
                   "budget_unit": "fraction of each prompt's length (slots = floor(frac * prompt tokens))",
                   "configs": labels, "tasks": ns.tasks, "quick": ns.quick, "lengths": ns.lengths,
                   "depths": ns.depths, "trials": ns.trials, "filler": ns.filler, "needle_style": ns.needle_style,
                   "key_digits": ns.key_digits, "answer_tokens": ns.answer_tokens, "nll_samples": ns.nll_samples,
                   "nll_prompt": ns.nll_prompt, "nll_cont": ns.nll_cont, "ruler_tasks": ns.ruler_tasks,
                   "ruler_samples": ns.ruler_samples, "ruler_prose": ns.ruler_prose, "ruler_length": ns.ruler_length,
                   "cache_settings": ns.settings,
                   "compile": ns.compile, "ops": ns.ops, "seed": ns.seed, "quantize": ns.quantize,
                   "group_size": ns.group_size, "act_quant": ns.act_quant, "quantization": gen.model.quantization},
        "texts": text_info,
    }
    try:
        if "passkey" in ns.tasks:
            t0 = time.perf_counter()
            fillers = ["repeat", "prose"] if ns.filler == "both" else [ns.filler]
            styles = list(passkey.NEEDLES) if ns.needle_style == "all" else ns.needle_style.split(",")
            rows = passkey.run(harness, lengths=ns.lengths, depths=ns.depths, trials=ns.trials, fillers=fillers,
                               styles=styles, key_digits=ns.key_digits, answer_tokens=ns.answer_tokens, prose=prose,
                               seed=ns.seed)
            results["passkey"] = {"rows": rows, "summary": passkey.summary(rows), "seconds": time.perf_counter() - t0}
            # written now as well: a run stopped during the NLL pass (a time-limited GPU lease) keeps its passkey table
            write_json(out / "quality.json", results)
        if "ruler" in ns.tasks:
            t0 = time.perf_counter()
            fingerprint = json.loads(json.dumps(
                {"model": a.name, "weights": ns.weights, "dtype": str(gen.dtype), "device": gen.device.type,
                 "ops": gen.backend, "quantization": gen.model.quantization, "cache_settings": ns.settings,
                 "prose": ruler.load_prose(ns.ruler_prose).source,
                 "length_convention": ns.ruler_length},
                default=str))
            done = resumed_ruler(out / "quality.json", fingerprint) if ns.resume else None

            def checkpoint(partial: dict[str, Any]) -> None:
                results["ruler"] = {**partial, "fingerprint": fingerprint, "seconds": time.perf_counter() - t0}
                results["wall_s"] = time.perf_counter() - t_all
                write_json(out / "quality.json", results)

            res = ruler_task.run(harness, tasks=ns.ruler_tasks, lengths=ns.lengths, samples=ns.ruler_samples,
                                 seed=ns.seed, prose=ns.ruler_prose, convention=ns.ruler_length, done=done,
                                 checkpoint=checkpoint)
            checkpoint(res)
        if "nll" in ns.tasks or "attn" in ns.tasks:
            t0 = time.perf_counter()
            results["nll"] = nll.run(harness, texts, n_samples=ns.nll_samples, prompt_tokens=ns.nll_prompt,
                                     cont_tokens=ns.nll_cont, attention_error="attn" in ns.tasks, seed=ns.seed)
            results["nll"]["seconds"] = time.perf_counter() - t0
    except Exception as e:
        traceback.print_exc()
        results["error"] = f"{type(e).__name__}: {e}\n" + traceback.format_exc(limit=3)
    results["wall_s"] = time.perf_counter() - t_all
    print_tables(results, labels)
    write_json(out / "quality.json", results)
    written = [] if ns.no_plot else quality_plots(results, out, labels)
    print(f"\n[quality] wall time {results['wall_s']:.1f}s; wrote {out / 'quality.json'}"
          + "".join(f", {out / w}" for w in written))
    if "error" in results:
        print(f"[quality] FAILED: {results['error'].splitlines()[0]}")
        return 1
    return 0


cli = main  # the command line (python -m bench.quality, python -m zmzoo eval)

if __name__ == "__main__":
    sys.exit(cli())

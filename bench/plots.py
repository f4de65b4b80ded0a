"""The figures of the bench programs (matplotlib, the Agg backend: files only)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

GiB = 2**30


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def decode_plot(results: dict[str, Any], path: Path) -> list[Path]:
    """``bench.decode``'s figures: tokens/s, % of the roofline and peak memory (or cache size on CPU) against the
    context per method and peer at ``path``; with max-batch rows, their total tokens/s beside it
    (``decode_max_batch.png``). Returns the files written."""
    plt = _pyplot()
    written = [path]
    rows = [r for r in results["results"] + results.get("peers", []) if r.get("ok")]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(r["method"], []).append(r)
    cuda = results["env"]["device"].startswith("cuda")
    for name, rs in series.items():
        rs = sorted(rs, key=lambda r: r["context"])
        x = [r["context"] for r in rs]
        style = "--" if name.startswith("hf") else "-"
        axes[0].plot(x, [r["tokens_per_s"] for r in rs], style, marker="o", label=name)
        axes[1].plot(x, [r["pct_roofline"] for r in rs], style, marker="o", label=name)
        if cuda:
            axes[2].plot(x, [(r.get("decode_peak_bytes") or 0) / GiB for r in rs], style, marker="o", label=name)
        else:
            axes[2].plot(x, [(r.get("cache_bytes") or 0) / 2**20 for r in rs], style, marker="o", label=name)
    dev = results["env"].get("gpu") or "CPU"
    axes[0].set(xlabel="context (tokens)", ylabel="decode tokens/s", title=f"decode throughput ({dev})")
    axes[1].set(xlabel="context (tokens)", ylabel="% of roofline", title="% of bandwidth roofline")
    if cuda:
        axes[2].set(xlabel="context (tokens)", ylabel="GiB", title="peak GPU memory during decode")
    else:
        axes[2].set(xlabel="context (tokens)", ylabel="MiB", title="KV cache size (CPU run: no GPU memory)")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    mb = [r for r in results.get("max_batch", []) if r.get("ok")]
    fig.suptitle(f"zmzoo decode: {results['config']['model']} ({results['config']['weights']}), "
                 f"batch {results['config']['batch']}, {results['config']['budget']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    if mb:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        labels = [f"{r['method']}\n{r['context']}" for r in mb]
        ax.bar(labels, [r["tokens_per_s"] for r in mb])
        for i, r in enumerate(mb):
            ax.text(i, r["tokens_per_s"], f"b={r['batch']}", ha="center", va="bottom", fontsize=8)
        ax.set(ylabel="total tokens/s at the largest batch that fits", title="max-batch throughput")
        fig.tight_layout()
        fig.savefig(path.with_name("decode_max_batch.png"), dpi=110)
        plt.close(fig)
        written.append(path.with_name("decode_max_batch.png"))
    return written


def quality_plots(results: dict[str, Any], out: Path, labels: list[str]) -> list[str]:
    """``bench.quality``'s figures in ``out``: passkey accuracy per (length, depth) cell, RULER's score against the
    length (``ruler_plot``), NLL and top-1 agreement against the budget, attention-output error per layer. Returns
    the file names written."""
    plt = _pyplot()
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
    rl = results.get("ruler")
    if rl and rl["summary"]["by_length"]:
        ruler_plot(rl, out / "ruler.png", labels, model=results["config"]["model"])
        written.append("ruler.png")
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


def ruler_plot(rl: dict[str, Any], path: Path, labels: list[str], model: str = "") -> None:
    """RULER's score (0-100, mean over tasks) against the length: one panel per budget, one line per method at that
    budget, the full cache (black, dashed) on every panel; a hollow marker where some tasks are missing."""
    plt = _pyplot()
    by = rl["summary"]["by_length"]
    budgets = sorted({b["budget"] for b in by if b["budget"] is not None})
    lengths = sorted({b["length"] for b in by})
    order = {lab: i for i, lab in enumerate(labels)}
    methods = sorted({b["method"] for b in by if b["budget"] is not None},
                     key=lambda m: min(order.get(b["label"], len(order)) for b in by if b["method"] == m))
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    full = sorted((b["length"], b) for b in by if b["budget"] is None)
    panels = budgets or [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.6, 4.2), squeeze=False, sharey=True)

    def line(ax, pts, **kw):
        x = [n for n, _ in pts]
        ax.plot(x, [b["score"] for _, b in pts], **kw)
        hollow = [(n, b["score"]) for n, b in pts if not b["complete"]]
        if hollow:
            ax.scatter([n for n, _ in hollow], [v for _, v in hollow], s=60, facecolors="white",
                       edgecolors=kw.get("color", "k"), zorder=3)

    for ax, budget in zip(axes[0], panels):
        if full:
            line(ax, full, color="k", ls="--", marker="s", label="full")
        for m in methods:
            pts = sorted((b["length"], b) for b in by if b["method"] == m and b["budget"] == budget)
            if pts:
                line(ax, pts, color=colors[m], marker="o", label=m)
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_ylim(-2, 102)
        ax.set(xlabel="length (tokens)", title="full cache" if budget is None else f"budget {budget:g} of the prompt")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("RULER score (0-100, mean over tasks)")
    handles, names = [], []
    for ax in axes[0]:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="center right", fontsize=8)
    samples = max((c["n"] for c in rl["summary"]["cells"]), default=0)
    fig.suptitle(f"RULER ({len(rl['tasks'])} tasks, up to {samples} sample(s) each): {model}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)

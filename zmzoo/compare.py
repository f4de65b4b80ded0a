"""Several cache configurations side by side on one prompt, on one loaded model (no weights copied).

    >>> import zmzoo
    >>> gen = zmzoo.load("smollm2-135m", method="full")
    >>> ids = gen.encode_prompt("...a long prompt...")
    >>> res = zmzoo.compare_caches(gen, {"full": {"method": "full"},
    ...                                  "zm@10%": {"method": "zeromerge", "kv_budget": len(ids) // 10}},
    ...                            ids, steps=32, attention_error=True)
    >>> res.tokens_of("zm@10%"), res.attention_error[res.row("zm@10%")]

How it runs: a shared copy of ``gen``'s model (``Transformer.shared_copy``: the same weight tensors) gets one
``zmzoo.cache.FanoutCache`` per layer, configuration i in batch row i. The prompt is prefilled once (each layer hands
its q/k/v to every configuration, which scores and compresses it its own way), then all configurations decode as the
rows of one batch, greedy or teacher-forced. Batch rows are independent, so row i computes what ``gen.with_cache(**
configs[label])`` computes alone at the same ``max_seq_len`` (tests/test_compare.py checks it).
"""

from __future__ import annotations

import numbers
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from zmzoo.cache import CacheConfig, FanoutCache, FullCache, build_caches, resolve_cache_config


@dataclass
class Comparison:
    """What ``compare_caches`` measured. Rows are the configurations that ran, in the order given.

    Attributes:
        labels: the configurations that ran (row i is ``labels[i]``).
        skipped: label -> why it could not run at this prompt length (the settings' validation error).
        prompt_len: tokens of the prompt.
        max_seq_len: the caches' max_seq_len (what ``kv_ratio`` is a fraction of).
        tokens: (N, steps) int64 on the host: step 0 is the prefill's greedy token, step i the argmax after decode
            step i (greedy decoding feeds it back; with ``forced`` it is the argmax of the teacher-forced logits).
            With ``stop_ids``, greedy decoding may end early: (N, S) with S <= steps, every row holding a stop token.
        logits: (N, steps, V) fp32 on the host when ``forced`` was given: step i predicts ``forced[i]`` (step 0 from the
            prefill, step i from decoding ``forced[i - 1]``), as ``Generator.score`` lays them out; else None.
        attention_error: (N, n_layers) fp64 on the host with ``attention_error=True``: per row and layer, the mean
            over decode steps of ``||out - out_full|| / ||out_full||`` over the row's heads, ``out_full`` from a full
            cache fed the same row's q/k/v; else None.
        attention_steps: decode steps the attention error is averaged over (steps - 1).
        prefill_max_diff: the largest difference between the configurations' prefill attention outputs (0 where
            every cache computes the same causal attention, as they should).
        cache_configs: label -> the validated ``CacheConfig`` each configuration ran with (its budget in slots).
        prefill_s, decode_s: wall seconds of the prefill (every configuration's, the drafts included) and of the
            decode steps (the device synchronized at the end of each).
    """

    labels: list[str]
    skipped: dict[str, str]
    prompt_len: int
    max_seq_len: int
    tokens: Tensor
    logits: Tensor | None = None
    attention_error: Tensor | None = None
    attention_steps: int = 0
    prefill_max_diff: float = 0.0
    cache_configs: dict[str, CacheConfig] = field(default_factory=dict)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def row(self, label: str) -> int:
        """Batch row of configuration ``label`` (KeyError naming why when it was skipped)."""
        if label in self.skipped:
            raise KeyError(f"configuration {label!r} was skipped: {self.skipped[label]}")
        return self.labels.index(label)

    def tokens_of(self, label: str) -> list[int]:
        return self.tokens[self.row(label)].tolist()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _decode_fn(model, compile: bool | str | Callable, device: torch.device) -> Callable[[Tensor, Tensor], Tensor]:
    """The decode step as ``Generator`` compiles it: False eager, True inductor (CUDA graphs on CUDA), else a
    ``torch.compile`` backend."""
    if compile is False or compile is None:
        return model.decode
    if compile is True:
        mode = "reduce-overhead" if device.type == "cuda" else None
        return torch.compile(model.decode, fullgraph=True, dynamic=False, mode=mode)
    return torch.compile(model.decode, fullgraph=True, dynamic=False, backend=compile)


@torch.inference_mode()
def _ids(seq: Sequence[Any]) -> list[Any]:
    """Token ids as Python ints (numpy and tensor integers converted; bools and other values kept, for
    ``Generator._check_ids`` to refuse by name)."""
    seq = seq.tolist() if isinstance(seq, Tensor) else seq
    return [int(t) if isinstance(t, numbers.Integral) and not isinstance(t, bool) else t for t in seq]


def compare_caches(gen, configs: Mapping[str, Mapping[str, Any]], prompt_ids: Sequence[int], *, steps: int,
                   forced: Sequence[int] | None = None, attention_error: bool = False,
                   compile: bool | str | Callable = False, max_seq_len: int | None = None,
                   stop_ids: Collection[int] | None = None, stop_every: int = 8) -> Comparison:
    """Run cache configurations side by side on one prompt through a shared copy of ``gen``'s model.

    Args:
        gen: a loaded ``Generator``: its weights, dtype, device and ops backend are used (its own caches are not
            touched, and no weight is copied).
        configs: label -> cache settings as ``Generator.with_cache`` takes them (``method``, ``kv_ratio`` or
            ``kv_budget``, ``preset``, and cache settings such as ``tail``). A configuration whose settings are
            invalid at this prompt length (e.g. a budget below ``tail + dense``) is skipped and reported in
            ``skipped`` with the reason; a setting that does not exist (TypeError) is raised.
        prompt_ids: the prompt's token ids.
        steps: tokens per configuration: the prefill's plus ``steps - 1`` decode steps.
        forced: ``steps`` token ids to teacher-force (step i feeds ``forced[i - 1]``; the logits are returned); None
            decodes greedily.
        attention_error: also measure each row's per-layer attention-output error against full attention over the
            same row's q/k/v (a full cache of every row kept alongside).
        compile: compile the decode step: False (eager), True (inductor; CUDA graphs on CUDA) or a
            ``torch.compile`` backend name. A fresh compile each call: the caches differ from call to call.
        max_seq_len: the caches' length (default ``len(prompt_ids) + steps``, what ``Generator.score`` needs);
            ``kv_ratio`` is a fraction of it.
        stop_ids: greedy decoding only: stop once every row has produced one of these tokens (eos ids, as
            ``Generator.generate`` stops), looked at every ``stop_every`` steps (one host sync each), so up to
            ``stop_every - 1`` steps run past the last row's stop. A row that stopped keeps decoding beside the others
            (what it produces after its stop token is not its answer); no row's tokens up to its stop change.

    Returns:
        A ``Comparison`` (rows in the order of ``configs``, skipped ones left out).

    The decode step's GEMV plans are set for N rows as ``gen``'s own are (``Transformer.set_gemv``); what timing them
    measured joins ``gen.model.gemv_tuning`` (the same weights), so later calls with N configurations reuse it.
    """
    prompt = _ids(prompt_ids)
    gen._check_ids(prompt, "compare_caches: prompt")  # the embedding would fail without naming the token
    t = len(prompt)
    if t == 0:
        raise ValueError("compare_caches: the prompt is empty")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"compare_caches: steps={steps!r} must be a whole number >= 1")
    if forced is not None:
        forced = _ids(forced)
        gen._check_ids(forced, "compare_caches: forced")
        if len(forced) != steps:
            raise ValueError(f"compare_caches: forced has {len(forced)} tokens for steps={steps} (one per step)")
        if stop_ids:
            raise ValueError("compare_caches: stop_ids is for greedy decoding (forced tokens run every step)")
    if isinstance(stop_every, bool) or not isinstance(stop_every, int) or stop_every < 1:
        raise ValueError(f"compare_caches: stop_every={stop_every!r} must be a whole number >= 1")
    max_seq_len = t + steps if max_seq_len is None else max_seq_len
    if t + steps > max_seq_len:
        raise ValueError(f"compare_caches: a prompt of {t} tokens and {steps} steps exceed max_seq_len {max_seq_len}")
    a = gen.model.args  # a tensor-parallel rank's own heads
    common = dict(n_layers=a.n_layers, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads, head_dim=a.head_dim,
                  max_seq_len=max_seq_len, dtype=gen.dtype, device=gen.device, sliding_window=a.sliding_window,
                  backend=gen.backend)
    per_config, labels, skipped, resolved = [], [], {}, {}  # resolved: label -> CacheConfig
    for label, settings in configs.items():
        try:
            cfg = resolve_cache_config(max_seq_len=max_seq_len, **settings)
            per_config.append(build_caches(cfg, batch_size=1, **common))
        except ValueError as e:
            skipped[label] = str(e)
            continue
        labels.append(label)
        resolved[label] = cfg
    n = len(labels)
    if n == 0:
        return Comparison(labels, skipped, t, max_seq_len, torch.zeros(0, steps, dtype=torch.int64))
    shadows: list[FullCache | None] = [None] * a.n_layers
    if attention_error:
        shadows = build_caches(resolve_cache_config(max_seq_len=max_seq_len, method="full"), batch_size=n, **common)
    layers = [FanoutCache([pc[i] for pc in per_config], shadows[i]) for i in range(a.n_layers)]

    model = gen.model.shared_copy()
    model.setup_caches(layers, max_seq_len)
    model.set_gemv(gen.gemv, rows=(n,))
    gen.model.gemv_tuning.update(model.gemv_tuning)  # the same weights: an N-row batch is timed once, not per call
    try:
        dev = gen.device
        step = _decode_fn(model, compile, dev)
        t0 = time.perf_counter()
        logits0 = model.prefill(torch.tensor([prompt], device=dev), row=0)  # (1, V)
        pos = torch.full((n,), t, dtype=torch.int64, device=dev)
        tok = logits0.argmax(-1).expand(n).contiguous()
        model.finish_prefill(tok, pos, step, prompts=[prompt] * n,  # the prefill drafts (ZeroMerge's lookahead)
                             classes=gen.lookup_classes(layers))
        _sync(dev)
        t1 = time.perf_counter()
        toks = [tok]
        stops = torch.tensor(sorted({int(x) for x in stop_ids}), dtype=torch.int64, device=dev) if stop_ids else None
        stopped = torch.isin(tok, stops) if stops is not None else None  # (N,) rows that produced a stop token
        host: list[Tensor] = []  # logits blocks (N, steps in block, V) on the host
        block = [logits0.float().expand(n, -1)] if forced is not None else []
        for i in range(1, steps):
            if stopped is not None and i % stop_every == 0 and bool(stopped.all()):
                break  # i tokens so far, each row's stop among them
            inp = torch.full((n,), forced[i - 1], dtype=torch.int64, device=dev) if forced is not None else tok
            out = step(inp, pos)
            pos += 1
            tok = out.argmax(-1)
            toks.append(tok)
            if stopped is not None:
                stopped |= torch.isin(tok, stops)
            if forced is not None:
                block.append(out.to(torch.float32, copy=True))  # a CUDA graph's output is overwritten next step
                if len(block) == 64:  # to the host in blocks: (steps, V) per row stays bounded on the device
                    host.append(torch.stack(block, 1).cpu())
                    block = []
        if block:
            host.append(torch.stack(block, 1).cpu())
        tokens = torch.stack(toks, 1).cpu()
        _sync(dev)
        res = Comparison(labels, skipped, t, max_seq_len, tokens,
                         prefill_max_diff=max(layer.prefill_max_diff for layer in layers), cache_configs=resolved,
                         prefill_s=t1 - t0, decode_s=time.perf_counter() - t1)
        if forced is not None:
            res.logits = torch.cat(host, 1)
        if attention_error:
            cnt = layers[0].err_count.item()
            res.attention_error = torch.stack([layer.err_sum / max(cnt, 1) for layer in layers], 1).cpu()
            res.attention_steps = int(cnt)
        return res
    finally:
        model.detach_caches()


__all__ = ["Comparison", "compare_caches"]

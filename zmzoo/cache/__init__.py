"""KV caches: one protocol (``base.KVCache``), the full cache, ZeroMerge and eviction baselines, and ``FanoutCache``
(several configurations side by side, one per batch row: ``zmzoo.compare``).

``resolve_cache_config`` turns user settings into validated integer counts; ``build_caches`` allocates one cache per
layer. Every setting is checked here, at load, with an error naming it and its constraint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch

from zmzoo.cache.base import KVCache
from zmzoo.cache.eviction import H2OCache, KNormCache, SnapKVCache, StreamingCache, TOVACache
from zmzoo.cache.fanout import FanoutCache
from zmzoo.cache.full import FullCache
from zmzoo.cache.zeromerge import ZeroMergeCache

METHODS = ("full", "zeromerge", "h2o", "streaming", "snapkv", "tova", "knorm")
CACHE_CLASSES: dict[str, type[KVCache]] = {
    "full": FullCache,
    "zeromerge": ZeroMergeCache,
    "h2o": H2OCache,
    "streaming": StreamingCache,
    "snapkv": SnapKVCache,
    "tova": TOVACache,
    "knorm": KNormCache,
}

# settings each method accepts, with defaults (ZEROMERGE.md "Settings and defaults")
_DEFAULTS: dict[str, dict[str, Any]] = {
    "full": {},
    "zeromerge": dict(tail=0.1, dense=1, decay=0.98, logw_scale=1.0, metric="dot", score_merge="max",
                      score_window=None, score_pool=None, lookahead=0,
                      lookahead_prompt_weight=1.0, lookahead_rounds=1, lookahead_greedy=0, lookahead_pin=0.0,
                      lookahead_pin_extend=0, lookahead_pin_spans=1, lookahead_pin_copied=True, lookahead_per_slot=0.0),
    "h2o": dict(tail=0.1, decay=0.98, score_window=None, score_pool=None),
    "snapkv": dict(tail=0.1, score_window=32, score_pool=5),
    "streaming": dict(sinks=4),
    # TOVA's decay is 0 (each step's attention replaces the scores), fixed by its cache class rather than a setting
    "tova": dict(tail=0.1),
    "knorm": dict(tail=0.1),
}

# named variants of ZeroMerge's settings (explicit settings override them)
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    # the later version of the paper: tail 0.5 B, dense 2 % of B - tail, logw scale 1
    "paper-v2": dict(tail=0.5, dense=0.02, logw_scale=1.0),
    # keeps what the answer will read: after the first pass, 8 greedy draft tokens decoded through the compressed
    # cache, extended to 32 from the prompt itself, rescore the stashed prompt and it is selected again
    # (docs/retrieval.md: diagnosis, what was tried, measurements; lookahead_pin is measured there, not part of it)
    "retrieval": dict(lookahead=32, lookahead_greedy=8),
}

DEFAULT_KV_RATIO = 0.2


@dataclass(frozen=True)
class CacheConfig:
    """A validated cache configuration: integer slot counts, resolved from ratios."""

    method: str = "full"
    budget: int | None = None
    tail: int | None = None
    dense: int | None = None
    decay: float = 0.98
    logw_scale: float = 1.0
    metric: str = "dot"
    score_merge: str = "max"
    score_window: int | None = None
    score_pool: int | None = None
    lookahead: int = 0
    lookahead_prompt_weight: float = 1.0
    lookahead_rounds: int = 1
    lookahead_greedy: int = 0
    lookahead_pin: float = 0.0
    lookahead_pin_extend: int = 0
    lookahead_pin_spans: int = 1
    lookahead_pin_copied: bool = True
    lookahead_per_slot: float = 0.0  # > 0: ``lookahead`` above is already the draft length it resolved to
    sinks: int | None = None
    preset: str | None = None

    def cache_kwargs(self) -> dict[str, Any]:
        """Constructor arguments of the method's cache class."""
        if self.method == "full":
            return {}
        keys = ({"budget"} | set(_DEFAULTS[self.method])) - {"lookahead_per_slot"}  # resolved into lookahead
        return {k: v for k, v in asdict(self).items() if k in keys}


def _count(name: str, value: Any, of: int, minimum: int) -> int:
    """A fraction (< 1) of ``of`` (floored, at least ``minimum``) or an integer count."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"cache setting {name}={value!r} must be a number (a fraction < 1 or a count >= 1)")
    if value <= 0:
        raise ValueError(f"cache setting {name}={value!r} must be positive")
    if value < 1:
        return max(minimum, math.floor(value * of))
    if float(value) != int(value):
        raise ValueError(f"cache setting {name}={value!r}: a count must be a whole number (or give a fraction < 1)")
    return int(value)


def resolve_cache_config(
    *,
    max_seq_len: int,
    method: str | None = None,
    kv_ratio: float | None = None,
    kv_budget: int | None = None,
    preset: str | None = None,
    **settings: Any,
) -> CacheConfig:
    """Validate and resolve cache settings (see ZEROMERGE.md for the rounding rules)."""
    if method is None:
        method = "zeromerge" if (kv_ratio is not None or kv_budget is not None or preset is not None) else "full"
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
    if method == "full":
        bad = {"kv_ratio": kv_ratio, "kv_budget": kv_budget, "preset": preset}
        bad = [k for k, v in bad.items() if v is not None] + sorted(settings)
        if bad:
            raise ValueError(f"method='full' keeps every token: the setting(s) {', '.join(bad)} do not apply")
        return CacheConfig(method="full")
    if preset is not None:
        if method != "zeromerge":
            raise ValueError(f"preset={preset!r} applies to method='zeromerge' only, not {method!r}")
        if preset not in PRESETS:
            raise ValueError(f"preset={preset!r} is not one of {', '.join(PRESETS)}")
    allowed = _DEFAULTS[method]
    unknown = sorted(set(settings) - set(allowed))
    if unknown:
        known = ", ".join(allowed) or "none"
        raise TypeError(f"cache setting(s) {', '.join(unknown)} do not apply to method {method!r} (it takes: {known})")
    vals = {**allowed, **(PRESETS[preset] if preset else {}), **settings}

    if kv_ratio is not None and kv_budget is not None:
        raise ValueError("give kv_ratio or kv_budget, not both")
    if kv_budget is not None:
        if isinstance(kv_budget, bool) or not isinstance(kv_budget, int) or kv_budget < 1:
            raise ValueError(f"kv_budget={kv_budget!r} must be a positive whole number of slots")
        budget = kv_budget
    else:
        ratio = DEFAULT_KV_RATIO if kv_ratio is None else kv_ratio
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not 0 < ratio <= 1:
            raise ValueError(f"kv_ratio={ratio!r} must be in (0, 1]: a fraction of max_seq_len ({max_seq_len})")
        budget = math.floor(ratio * max_seq_len)
    if budget > max_seq_len:
        raise ValueError(f"kv budget {budget} exceeds max_seq_len {max_seq_len}: a full cache would be smaller")

    cfg: dict[str, Any] = dict(method=method, budget=budget, preset=preset)
    if method == "streaming":
        sinks = vals["sinks"]
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"cache setting sinks={sinks!r} must be a whole number >= 0")
        if budget < sinks + 2:
            raise ValueError(f"kv budget {budget} must be at least sinks + 2 = {sinks + 2} (a ring of 2 or more)")
        cfg.update(sinks=sinks, tail=budget - sinks + 1, dense=sinks)
        return CacheConfig(**cfg)

    tail = _count("tail", vals["tail"], budget, 2)
    if tail < 2:
        raise ValueError(f"cache setting tail={tail} must be at least 2 (the ring plus the current token)")
    if method == "zeromerge":
        dense = _count("dense", vals["dense"], budget - tail, 1)
        if budget <= tail + dense:
            raise ValueError(
                f"kv budget {budget} must exceed tail + dense = {tail} + {dense} = {tail + dense} "
                f"(max_seq_len {max_seq_len}, kv_ratio {kv_ratio}, kv_budget {kv_budget})"
            )
        for key in ("logw_scale",):
            if not isinstance(vals[key], (int, float)) or vals[key] < 0:
                raise ValueError(f"cache setting {key}={vals[key]!r} must be a number >= 0")
        if vals["metric"] not in ("dot", "l2"):
            raise ValueError(f"cache setting metric={vals['metric']!r} must be 'dot' or 'l2'")
        if vals["score_merge"] not in ("max", "sum"):
            raise ValueError(f"cache setting score_merge={vals['score_merge']!r} must be 'max' or 'sum'")
        la = vals["lookahead"]
        if isinstance(la, bool) or not isinstance(la, int) or la < 0:
            raise ValueError(f"cache setting lookahead={la!r} must be a whole number of draft tokens >= 0")
        lpw = vals["lookahead_prompt_weight"]
        if isinstance(lpw, bool) or not isinstance(lpw, (int, float)) or lpw < 0:
            raise ValueError(f"cache setting lookahead_prompt_weight={lpw!r} must be a number >= 0")
        rounds = vals["lookahead_rounds"]
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"cache setting lookahead_rounds={rounds!r} must be a whole number >= 1")
        greedy = vals["lookahead_greedy"]
        if isinstance(greedy, bool) or not isinstance(greedy, int) or not 0 <= greedy <= la:
            raise ValueError(f"cache setting lookahead_greedy={greedy!r} must be a whole number in [0, lookahead={la}] "
                             f"(0: every draft token greedy)")
        pin = vals["lookahead_pin"]
        if isinstance(pin, bool) or not isinstance(pin, (int, float)) or not 0 <= pin <= 1:
            raise ValueError(f"cache setting lookahead_pin={pin!r} must be a fraction in [0, 1] of the top slots")
        for key, low in (("lookahead_pin_extend", 0), ("lookahead_pin_spans", 1)):
            x = vals[key]
            if isinstance(x, bool) or not isinstance(x, int) or x < low:
                raise ValueError(f"cache setting {key}={x!r} must be a whole number >= {low}")
        if not isinstance(vals["lookahead_pin_copied"], bool):
            raise TypeError(f"cache setting lookahead_pin_copied={vals['lookahead_pin_copied']!r} must be True or "
                            f"False")
        per_slot = vals["lookahead_per_slot"]
        if isinstance(per_slot, bool) or not isinstance(per_slot, (int, float)) or per_slot < 0:
            raise ValueError(f"cache setting lookahead_per_slot={per_slot!r} must be a number >= 0 (draft tokens a "
                             f"slot of the budget)")
        if per_slot and not la:
            raise ValueError(f"cache setting lookahead_per_slot={per_slot!r} needs lookahead > 0 (the longest draft)")
        if per_slot:  # the draft grows with the budget: round(per_slot * budget), within [greedy (1), lookahead]
            la = min(la, max(greedy or 1, round(per_slot * budget)))
        cfg.update(dense=dense, logw_scale=float(vals["logw_scale"]), metric=vals["metric"],
                   score_merge=vals["score_merge"], lookahead=la, lookahead_per_slot=float(per_slot),
                   lookahead_prompt_weight=float(lpw),
                   lookahead_rounds=rounds, lookahead_greedy=greedy, lookahead_pin=float(pin),
                   lookahead_pin_extend=vals["lookahead_pin_extend"], lookahead_pin_spans=vals["lookahead_pin_spans"],
                   lookahead_pin_copied=vals["lookahead_pin_copied"])
    else:
        if budget <= tail:
            raise ValueError(f"kv budget {budget} must exceed tail {tail} (max_seq_len {max_seq_len})")
        cfg.update(dense=0)
    if method == "tova":
        cfg["decay"] = 0.0  # what TOVACache runs with (not a setting: the check below is for decays that accumulate)
    if "decay" in vals:
        d = vals["decay"]
        if not isinstance(d, (int, float)) or not 0 < d <= 1:
            raise ValueError(f"cache setting decay={d!r} must be in (0, 1]")
        cfg["decay"] = float(d)
    for key in ("score_window", "score_pool"):
        x = vals.get(key)
        if x is not None and (isinstance(x, bool) or not isinstance(x, int) or x < 1):
            raise ValueError(f"cache setting {key}={x!r} must be None or a whole number >= 1")
        cfg[key] = x
    if cfg.get("score_pool") is not None and cfg["score_pool"] % 2 == 0:
        raise ValueError(f"cache setting score_pool={cfg['score_pool']} must be odd (a centred window)")
    cfg["tail"] = tail
    return CacheConfig(**cfg)


def build_caches(
    config: CacheConfig,
    *,
    n_layers: int,
    batch_size: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    max_seq_len: int,
    dtype: torch.dtype,
    device: torch.device | str,
    sliding_window: int | None = None,
    backend: str = "torch",
) -> list[KVCache]:
    """One cache module per layer, buffers allocated once."""
    if config.method != "full" and sliding_window is not None and max_seq_len > sliding_window:
        raise ValueError(
            f"method {config.method!r} on a sliding-window model (window {sliding_window}) needs max_seq_len <= "
            f"{sliding_window}: compressed caches keep tokens older than the window, which the model never attends"
        )
    cls = CACHE_CLASSES[config.method]
    common = dict(batch_size=batch_size, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                  max_seq_len=max_seq_len, dtype=dtype, device=device, sliding_window=sliding_window,
                  backend=backend)
    return [cls(**common, **config.cache_kwargs()) for _ in range(n_layers)]


def full_cache_nbytes(*, n_layers: int, batch_size: int, n_kv_heads: int, head_dim: int, max_seq_len: int,
                      dtype: torch.dtype) -> int:
    """Bytes a full cache of the same shape would hold (keys and values)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * n_layers * batch_size * n_kv_heads * max_seq_len * head_dim * itemsize


__all__ = ["KVCache", "FullCache", "ZeroMergeCache", "H2OCache", "StreamingCache", "SnapKVCache", "TOVACache",
           "KNormCache", "FanoutCache", "CacheConfig", "METHODS", "PRESETS", "resolve_cache_config", "build_caches",
           "full_cache_nbytes"]

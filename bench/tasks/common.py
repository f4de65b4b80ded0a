"""What every quality task shares: the configurations under test (method x budget as a fraction of each prompt) and
``Harness.run``, which runs them side by side on one prompt through ``zmzoo.compare_caches``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bench.timing import free_memory
from zmzoo.cache import resolve_cache_config
from zmzoo.compare import Comparison, compare_caches


@dataclass(frozen=True)
class Config:
    """A cache configuration of the harness: ``method`` (a cache method, or "method:preset", e.g.
    zeromerge:retrieval) at ``frac`` of each prompt's length (``floor(frac * prompt tokens)`` slots; None: the full
    cache)."""

    method: str
    frac: float | None

    @property
    def label(self) -> str:
        return "full" if self.frac is None else f"{self.method}@{self.frac:g}"

    @property
    def cache_method(self) -> str:
        return self.method.split(":")[0]

    @property
    def preset(self) -> str | None:
        return self.method.split(":")[1] if ":" in self.method else None

    def slots(self, prompt_len: int) -> int | None:
        return None if self.frac is None else math.floor(self.frac * prompt_len)

    def settings(self, prompt_len: int, cache_settings: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """``compare_caches`` settings at a prompt of ``prompt_len`` tokens; ``cache_settings`` maps a ``method``
        string (as given, preset included) to extra settings (``--cache-setting METHOD.KEY=VALUE``)."""
        if self.frac is None:
            return {"method": "full"}
        return {"method": self.cache_method, "kv_budget": max(self.slots(prompt_len), 1), "preset": self.preset,
                **cache_settings.get(self.method, {})}


@dataclass
class Harness:
    """The loaded model and the configurations a task runs.

    Attributes:
        gen: a ``Generator`` with a tokenizer (its weights and ops are used; its own cache is not).
        configs: the configurations, in table order.
        cache_settings: extra cache settings per ``Config.method``.
        compile: ``compare_caches``'s compile (False, True or a backend name).
    """

    gen: Any
    configs: list[Config]
    cache_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    compile: bool | str = False

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.configs]

    def config(self, label: str) -> Config:
        return next(c for c in self.configs if c.label == label)

    def check(self) -> None:
        """Fail now on settings that are wrong at any prompt length (an unknown method, preset or setting), rather
        than report them skipped at every sample."""
        n = 1 << 20
        for c in self.configs:
            try:
                resolve_cache_config(max_seq_len=n, **c.settings(n, self.cache_settings))
            except (TypeError, ValueError) as e:
                raise SystemExit(f"configuration {c.label}: {e}") from None

    def subset(self, labels: list[str]) -> Harness:
        """The same model and settings with only the configurations ``labels`` (in table order)."""
        return Harness(self.gen, [c for c in self.configs if c.label in labels], self.cache_settings, self.compile)

    def run(self, prompt: list[int], *, steps: int, forced: list[int] | None = None, attention_error: bool = False,
            stop_ids: list[int] | None = None) -> Comparison:
        """Every configuration on ``prompt`` side by side (``zmzoo.compare_caches``); those invalid at this prompt's
        length come back in ``skipped``. ``stop_ids`` (greedy only): stop once every row has produced one."""
        if self.compile:
            free_memory(self.gen.device)  # this prompt's caches have other shapes: compile afresh, not on top
        configs = {c.label: c.settings(len(prompt), self.cache_settings) for c in self.configs}
        return compare_caches(self.gen, configs, prompt, steps=steps, forced=forced, attention_error=attention_error,
                              compile=self.compile, max_seq_len=len(prompt) + steps + 1, stop_ids=stop_ids)

"""zmzoo: compile-friendly LLM inference with compressed (ZeroMerge) KV caches.

    >>> import zmzoo
    >>> gen = zmzoo.load("smollm2-135m", kv_ratio=0.1)
    >>> gen.generate("What is the capital of France?", chat=True)

Nothing runs at import time; heavy modules load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Comparison", "Generator", "__version__", "compare_caches", "known_models", "load"]


def load(name_or_path: str, **kwargs):
    """Load a model and return a ready generator (see ``zmzoo.loading.load`` for every argument)."""
    from zmzoo.loading import load as _load

    return _load(name_or_path, **kwargs)


def known_models() -> list[str]:
    """Names ``zmzoo.load`` accepts besides paths and hub repo ids."""
    from zmzoo.models.config import known_names

    return known_names()


def compare_caches(gen, configs, prompt_ids, **kwargs):
    """Several cache configurations side by side on one prompt, on ``gen``'s weights (see
    ``zmzoo.compare.compare_caches`` for every argument and the returned ``Comparison``)."""
    from zmzoo.compare import compare_caches as _compare

    return _compare(gen, configs, prompt_ids, **kwargs)


def __getattr__(name: str):
    if name == "Generator":
        from zmzoo.generate import Generator

        return Generator
    if name == "Comparison":
        from zmzoo.compare import Comparison

        return Comparison
    raise AttributeError(f"module 'zmzoo' has no attribute {name!r}")

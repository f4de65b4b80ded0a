"""The quality harness's tasks (``bench.quality``), one module each, importable on their own.

A task is a function ``run(h: Harness, ..., **its options) -> rows or a dict`` (``bench.tasks.common.Harness``: the
loaded Generator and the configurations under test). It builds its prompts, calls ``h.run(prompt, steps=...,
forced=..., attention_error=...)`` once per prompt (every configuration side by side through
``zmzoo.compare_caches``; ``Comparison.skipped`` says which ones could not run at that length) and returns JSON-ready
records. To add one: a module here with its ``run``, a ``--tasks`` name and its options in
``bench/quality.py``, a table and plot there if it wants them.

- ``passkey``: ``bench.tasks.passkey.run`` (and ``summary``);
- ``ruler``: ``bench.tasks.ruler.run`` (and ``summary``; RULER's tasks come from ``bench/ruler.py``);
- ``nll`` and ``attn``: ``bench.tasks.nll.run``;
- ``bench.tasks.texts``: the texts (fillers, NLL samples).
"""

"""zmzoo's benchmark programs, run from the root of a source checkout (they are not part of the installed package):

    python -m bench.decode ...      decode speed, memory, % of the bandwidth roofline, HF peer (python -m zmzoo bench)
    python -m bench.quality ...     passkey, teacher-forced NLL, attention-output error (python -m zmzoo eval)
    python -m bench.probes.NAME     one-off GPU investigations (bench/probes/)

Shared parts: ``bench.timing`` (timer, copy bandwidth, timed decode loop, memory, environment), ``bench.measure`` (one
decode configuration through ``Generator.with_cache``), ``bench.maxbatch``, ``bench.peers``, ``bench.plots`` and the
quality tasks in ``bench.tasks``. Every program drives zmzoo through its public API (``zmzoo.load``,
``Generator.with_cache``, ``zmzoo.compare_caches``) and writes JSON + PNG.
"""

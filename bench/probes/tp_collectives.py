"""The tensor-parallel decode step's collectives on one GPU: bench/decode.py under ``torchrun --nproc-per-node 1``
with the all-reduces forced in (world size 1 normally skips them, a sum over one rank being the value itself).

    python -m torch.distributed.run --standalone --nproc-per-node 1 -m bench.probes.tp_collectives \\
        [--no-force] BENCH.DECODE ARGS...

Forced, the step is the one a sharded model runs: the residual add out of the attention-output and MLP-down
products, and one NCCL all-reduce after each (64 for LLaMA-2-7B), traced by torch.compile and captured in the step's
CUDA graph. bench/decode.py's table then says what they cost against the unforced run (the same arguments with
``--no-force``), and its ``cudagraph_skips`` column whether the graph holds them. A probe, not a configuration: the
patch is of zmzoo's private helpers, here only.
"""

from __future__ import annotations

import sys

import torch.distributed as dist


def force_collectives() -> None:
    """Make a world-size-1 tensor-parallel model run the sharded step: partial-sum products and real all-reduces."""
    from torch.distributed import _functional_collectives as funcol

    import zmzoo.models.transformer as transformer
    from zmzoo.parallel import TensorParallel

    transformer._sharded = lambda tp: tp is not None

    def all_reduce(self, x):
        return funcol.all_reduce(x, "sum", self.group if self.group is not None else dist.group.WORLD)

    TensorParallel.all_reduce = all_reduce


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    force = "--no-force" not in argv
    argv = [a for a in argv if a != "--no-force"]
    if force:
        force_collectives()
    from bench.decode import main as decode_main

    print(f"[tp_collectives] all-reduces {'forced in' if force else 'skipped (world size 1)'}", flush=True)
    return decode_main(argv)


if __name__ == "__main__":
    sys.exit(main())

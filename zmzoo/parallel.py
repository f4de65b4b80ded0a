"""Tensor parallelism on ``torch.distributed``: which rank holds which rows and columns of every weight.

A model of ``n_heads`` query heads, ``n_kv_heads`` KV heads and an MLP of ``intermediate_size`` runs over the ``world``
ranks of a process group (Megatron-LM's layout, as gpt-fast's ``tp.py`` shards LLaMA):

- q, k, v (weights and biases) and gate, up are split by output: rank r holds query heads
  ``[r * n_heads / world, (r + 1) * n_heads / world)``, the KV heads they attend to, and its slice of the MLP's columns;
- the attention output ``wo`` and the down projection ``w2`` are split by input (the same heads, the same MLP
  columns), so each rank's product is a partial sum of the residual update: one all-reduce after each (two a layer);
- the embedding, the norms (q/k norms too: they act per head, on ``head_dim``) and the LM head are replicated. A
  vocab-sharded LM head would read 1/world of its bytes per rank but needs an all-gather of the logits every step; the
  replicated head costs each rank ``dim x vocab`` bytes a step (LLaMA-2-7B at world 2: 0.26 of 6.7 GB a rank) and
  gives every rank the same logits, so every rank samples the same token with no collective.

KV heads: with ``world`` dividing ``n_kv_heads`` each rank holds ``n_kv_heads / world`` of them. With fewer KV heads
than ranks (``world`` a multiple of ``n_kv_heads``, GQA), each KV head is replicated on ``world / n_kv_heads`` ranks
(``replicate_kv_heads``, the default; vLLM does the same): each rank holds one KV head and its cache, and the cache's
memory is that many times a single copy's.

Caches need nothing of this module: every cache in zmzoo keeps its state per (batch row, KV head), so a rank's caches
are the caches of a model with its local head counts (``local_args``), and no rank ever waits on another's cache.

The collectives are ``torch.distributed._functional_collectives.all_reduce``, which ``torch.compile(fullgraph=True)``
traces and a CUDA graph captures (NCCL); on a CPU they run over gloo. At world size 1 (``torchrun --nproc-per-node 1``)
every weight is read through the same sharding code and the all-reduce is skipped (a sum over one rank).
"""

from __future__ import annotations

import atexit
import datetime
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from zmzoo.models.config import ModelArgs

# zmzoo names -> the dimension each rank slices (0: rows, the output features; 1: columns, the input features) and
# which head count or width the slice follows
_SPLIT: tuple[tuple[re.Pattern[str], int, str], ...] = (
    (re.compile(r"^layers\.\d+\.attention\.wq\.(weight|bias)$"), 0, "q"),
    (re.compile(r"^layers\.\d+\.attention\.w[kv]\.(weight|bias)$"), 0, "kv"),
    (re.compile(r"^layers\.\d+\.attention\.wo\.weight$"), 1, "q"),
    (re.compile(r"^layers\.\d+\.feed_forward\.w[13]\.weight$"), 0, "mlp"),
    (re.compile(r"^layers\.\d+\.feed_forward\.w2\.weight$"), 1, "mlp"),
)


class TensorParallelError(ValueError):
    """A model that cannot be split over the ranks as asked: the message names the model, the count that does not
    divide and what would."""


@dataclass(frozen=True)
class Shard:
    """A rank's part of a weight: elements ``[start, stop)`` of dimension ``dim``, of ``full`` there in the whole
    weight (what the checkpoint's tensor must have)."""

    dim: int
    start: int
    stop: int
    full: int

    def of(self, t: Tensor) -> Tensor:
        return t.narrow(self.dim, self.start, self.stop - self.start)


class TensorParallel:
    """The rank's place in a tensor-parallel group and the split of ``args`` over it (module docstring).

    Raises ``TensorParallelError`` when ``world`` does not divide the query heads or the MLP width, or does not
    divide the KV heads and is not a multiple of them (or is one with ``replicate_kv_heads=False``)."""

    def __init__(self, args: ModelArgs, group: Any = None, *, rank: int | None = None, world: int | None = None,
                 replicate_kv_heads: bool = True):
        self.group = group
        self.rank = dist.get_rank(group) if rank is None else rank
        self.world = dist.get_world_size(group) if world is None else world
        w, name = self.world, args.name
        nh, nkv, inter = args.n_heads, args.n_kv_heads, args.intermediate_size
        if nh % w:
            raise TensorParallelError(f"model {name!r} has {nh} query heads, which {w} ranks cannot split evenly: "
                                      f"run it on a world size that divides {nh}")
        if inter % w:
            raise TensorParallelError(f"model {name!r} has an MLP of {inter} columns (intermediate_size), which {w} "
                                      f"ranks cannot split evenly")
        if nkv % w and (w % nkv or not replicate_kv_heads):
            if w % nkv:
                why = f"{w} is neither a divisor nor a multiple of {nkv}"
            else:
                why = f"{w} ranks exceed its KV heads and replicate_kv_heads=False"
            raise TensorParallelError(
                f"model {name!r} has {nkv} KV heads, which {w} ranks cannot split: {why}. Run it on a world size "
                f"that divides {nkv}" + (f", or on a multiple of {nkv} with replicate_kv_heads=True (each KV head "
                                         f"and its cache held by world / {nkv} ranks)" if not w % nkv else ""))
        self.n_heads = nh // w
        self.kv_replicas = max(1, w // nkv)  # ranks holding each KV head
        self.n_kv_heads = max(1, nkv // w)
        self.intermediate_size = inter // w
        self.head_dim = args.head_dim
        self.args = args

    def __repr__(self) -> str:
        return f"TensorParallel(rank={self.rank}, world={self.world}, kv_replicas={self.kv_replicas})"

    def local_args(self) -> ModelArgs:
        """The config of this rank's part: its query heads, KV heads and MLP width (``head_dim`` kept)."""
        return self.args.replace(n_heads=self.n_heads, n_kv_heads=self.n_kv_heads,
                                 intermediate_size=self.intermediate_size, head_dim=self.head_dim)

    def shard(self, name: str) -> Shard | None:
        """This rank's part of the weight ``name`` (a zmzoo name), or None where every rank holds all of it."""
        found = next(((dim, follows) for pattern, dim, follows in _SPLIT if pattern.match(name)), None)
        if found is None:
            return None
        dim, follows = found
        hd, r, a = self.head_dim, self.rank, self.args
        if follows == "q":
            return Shard(dim, r * self.n_heads * hd, (r + 1) * self.n_heads * hd, a.n_heads * hd)
        if follows == "kv":
            first = r // self.kv_replicas * self.n_kv_heads  # this rank's first KV head
            return Shard(dim, first * hd, (first + self.n_kv_heads) * hd, a.n_kv_heads * hd)
        return Shard(dim, r * self.intermediate_size, (r + 1) * self.intermediate_size, a.intermediate_size)

    def all_reduce(self, x: Tensor) -> Tensor:
        """The sum of ``x`` over the ranks (a functional collective: traced by torch.compile, captured by CUDA graphs);
        ``x`` itself at world size 1."""
        if self.world == 1:
            return x
        from torch.distributed import _functional_collectives as funcol

        return funcol.all_reduce(x, "sum", self.group if self.group is not None else dist.group.WORLD)

    def same_on_every_rank(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a host value, e.g. a random seed drawn on one rank)."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0) if self.group is not None else 0,
                                   group=self.group)
        return box[0]

    @property
    def is_first(self) -> bool:
        """Rank 0 of the group: the one that prints."""
        return self.rank == 0


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def torchrun_world_size() -> int | None:
    """``WORLD_SIZE`` of the environment (set by torchrun), or None when it is unset."""
    value = os.environ.get("WORLD_SIZE")
    if value is None:
        return None
    try:
        world = int(value)
    except ValueError:
        raise ValueError(f"environment variable WORLD_SIZE={value!r} is not a whole number") from None
    if world < 1:
        raise ValueError(f"environment variable WORLD_SIZE={value!r} must be at least 1")
    return world


def resolve_tensor_parallel(tp: Any, device: torch.device | None) -> tuple[Any, torch.device | None] | None:
    """``zmzoo.load``'s ``tp``: ``(process group or None for the default one, device)`` when the model is to be
    sharded, None when not.

    - "auto": shard over the default process group when one is initialised, or when torchrun's environment
      (``WORLD_SIZE``) is set, initialising it then (``init_process_group``: NCCL where the device is CUDA, else
      gloo); no sharding otherwise.
    - False / None: no sharding (every process loads the whole model).
    - a ``torch.distributed.ProcessGroup``: shard over it.

    Under torchrun a CUDA device without an index becomes ``cuda:LOCAL_RANK`` (set as the current device)."""
    if tp is None or tp is False:
        return None
    if tp is True:
        tp = "auto"
    if isinstance(tp, str):
        if tp != "auto":
            raise ValueError(f"tp={tp!r} must be 'auto', False or a torch.distributed ProcessGroup")
        group = None
        if not dist.is_initialized():
            if torchrun_world_size() is None:
                return None
            if not dist.is_available():
                raise RuntimeError("WORLD_SIZE is set (torchrun) but this torch build has no torch.distributed")
            device = _local_device(device, int(os.environ.get("RANK", "0")))  # before NCCL binds to a GPU
            backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
            atexit.register(_destroy)  # the group zmzoo made is zmzoo's to tear down
    elif isinstance(tp, dist.ProcessGroup):
        group = tp
    else:
        raise ValueError(f"tp={tp!r} must be 'auto', False or a torch.distributed ProcessGroup")
    return group, _local_device(device, dist.get_rank())


def _local_device(device: torch.device | None, rank: int) -> torch.device | None:
    """A CUDA device without an index as this process's GPU (``cuda:LOCAL_RANK``, else the global rank modulo the
    GPUs), made the current device; other devices as they are."""
    if device is not None and device.type == "cuda":
        if device.index is None:
            local = os.environ.get("LOCAL_RANK")
            device = torch.device("cuda", int(local) if local is not None else rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
    return device

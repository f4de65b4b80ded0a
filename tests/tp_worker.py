"""One rank of tests/test_tensor_parallel.py, started by torchrun: ``python -m torch.distributed.run --standalone
--nproc-per-node N tests/tp_worker.py SPEC OUT``.

SPEC is a JSON list of cases ``{"name", "path", "load": {zmzoo.load keywords}, "prompt": [ids], "continuation":
[ids], "sample": bool}``. For each case every rank loads ``path`` with ``zmzoo.load`` (tensor parallel by default:
torchrun's environment) and writes to OUT ``<name>.rank<r>.safetensors`` (the teacher-forced logits of
``Generator.score``, and with ``sample`` the tokens of a seedless sampled generation) and ``<name>.rank<r>.json``
(the error a load raised, the cache bytes, and how many graphs the compiled decode step and rescore have)."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import zmzoo
from zmzoo.models.transformer import Transformer, rescore_layer


def run_case(case: dict, out: Path, rank: int) -> None:
    info: dict = {}
    tensors: dict[str, torch.Tensor] = {}
    try:
        torch._dynamo.reset()
        gen = zmzoo.load(case["path"], device="cpu", dtype="fp32", verbose=False, **case["load"])
        tensors["logits"] = gen.score(case["prompt"], case["continuation"]).contiguous()
        if case.get("sample"):  # no seed: rank 0's seed is shared, so every rank samples the same tokens
            info["sampled"] = gen.generate([case["prompt"]], max_new_tokens=12, temperature=1.0, top_k=20,
                                           return_ids=True)
        stats = gen.cache_stats()
        info.update(cache_bytes=stats["cache_bytes"], weight_bytes=stats["weight_bytes"],
                    tensor_parallel=stats["tensor_parallel"])
        if gen.compile not in (False, None):
            from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

            info["decode_graphs"] = len(_debug_get_cache_entry_list(Transformer.decode.__code__))
            info["rescore_graphs"] = len(_debug_get_cache_entry_list(rescore_layer.__code__))
    except Exception as e:  # the test reads the error (the bad-setup cases expect one)
        info["error"] = f"{type(e).__name__}: {e}"
        info["traceback"] = traceback.format_exc()
    if tensors:
        save_file(tensors, str(out / f"{case['name']}.rank{rank}.safetensors"))
    (out / f"{case['name']}.rank{rank}.json").write_text(json.dumps(info))


def main() -> None:
    spec, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    for case in spec:
        run_case(case, out, rank)  # the first zmzoo.load initialises the process group (torchrun's environment)
        if not dist.is_initialized():  # a case that failed before zmzoo.load got that far
            dist.init_process_group("gloo")
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

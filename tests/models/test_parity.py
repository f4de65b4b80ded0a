"""Logits parity with HF transformers for every family, prefill and every decode step (fp32, full cache)."""

from __future__ import annotations

import pytest
import torch

import zmzoo

pytest.importorskip("transformers")

from tests.conftest import hf_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "smollm2"])
def test_logits_match_hf(tiny_ckpt, family):
    path, args = tiny_ckpt(family)
    ref = hf_model(path)
    torch.manual_seed(1)
    t_prompt, n_dec = 11, 9  # mistral's window (6) is shorter than the prompt
    ids = torch.randint(0, args.vocab_size, (1, t_prompt + n_dec))
    with torch.no_grad():
        want = ref(ids).logits[0]  # (T, V)
    gen = zmzoo.load(str(path), device="cpu", dtype=torch.float32, compile=False, max_seq_len=64)
    assert gen.args.sliding_window == args.sliding_window
    with torch.inference_mode():
        got_prefill = gen.model.prefill(ids[:, :t_prompt], row=0, all_logits=True)[0]
    assert rel_err(got_prefill, want[:t_prompt]) <= 1e-4
    scored = gen.score(ids[0, :t_prompt].tolist(), ids[0, t_prompt:].tolist())
    assert scored.shape == (n_dec, args.vocab_size)
    # row i of score predicts continuation[i]: it equals HF's logits at position t_prompt - 1 + i
    for i in range(n_dec):
        assert rel_err(scored[i], want[t_prompt - 1 + i]) <= 1e-4, f"decode step {i}"


def test_config_from_hf_roundtrip(tiny_ckpt):
    from zmzoo.models.config import ModelArgs

    for family in ("llama", "mistral", "qwen2", "qwen3"):
        path, args = tiny_ckpt(family)
        import json

        back = ModelArgs.from_hf_config(json.loads((path / "config.json").read_text()), name=args.name)
        for f in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "qkv_bias", "qk_norm", "tie_embeddings",
                  "sliding_window", "rope_theta", "intermediate_size", "vocab_size"):
            assert getattr(back, f) == getattr(args, f), (family, f)

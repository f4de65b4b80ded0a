"""Shared test helpers: tiny real configs of every family, written as HF checkpoints (safetensors + config.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from zmzoo.models.config import ModelArgs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without CUDA the Triton kernels (tests/ops) run in Triton's interpreter. Triton reads this when it is first imported
# (zmzoo.ops imports it, so any test module importing zmzoo.cache does), so it is set here, before collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = {"n_layers": 2, "dim": 64, "n_heads": 4, "n_kv_heads": 2, "intermediate_size": 96, "vocab_size": 128}

FAMILIES = {
    "llama": ("llama2-7b", {}),
    "mistral": ("mistral-7b-v0.1", {"sliding_window": 6}),
    "qwen2": ("qwen2.5-0.5b", {}),
    "qwen3": ("qwen3-0.6b", {"head_dim": 32}),
    "smollm2": ("smollm2-135m", {"n_kv_heads": 1}),
}


def tiny_args(family: str = "llama", **overrides) -> ModelArgs:
    name, extra = FAMILIES[family]
    return ModelArgs.from_name(name, **{**TINY, "max_position_embeddings": 256, **extra, **overrides})


def write_hf_checkpoint(path: Path, args: ModelArgs, seed: int = 0) -> Path:
    """Build the HF transformers model for ``args`` with random weights and save it (safetensors) to ``path``."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.AutoConfig.for_model(**args.to_hf_config())
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))  # non-trivial norm weights
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    return path


def hf_model(path: Path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


@pytest.fixture
def tiny_ckpt(tmp_path):
    """Factory: tiny_ckpt(family, **overrides) -> (dir, ModelArgs)."""

    def make(family: str = "llama", seed: int = 0, **overrides):
        args = tiny_args(family, **overrides)
        d = tmp_path / f"{family}-{seed}"
        write_hf_checkpoint(d, args, seed)
        return d, args

    return make


def read_json(p: Path) -> dict:
    return json.loads(Path(p).read_text())

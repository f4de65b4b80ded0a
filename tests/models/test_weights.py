"""safetensors checkpoints (HF names) -> zmzoo state dicts: renaming, shards, dtype, error messages, logits vs HF."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

import zmzoo
from tests.conftest import SDPACache
from zmzoo.models.config import ModelArgs
from zmzoo.models.transformer import Transformer
from zmzoo.models.weights import (
    HF_TO_ZMZOO,
    CheckpointError,
    check_state_dict,
    find_safetensors,
    hf_to_zmzoo_name,
    load_safetensors_state_dict,
    load_weights_into,
    zmzoo_to_hf_name,
)

transformers = pytest.importorskip("transformers")

FAMILIES = {
    "llama": dict(base="llama2-7b"),
    "mistral": dict(base="mistral-7b-v0.1", sliding_window=None),
    "qwen2": dict(base="qwen2.5-0.5b"),  # q/k/v biases, tied embeddings
    "qwen3": dict(base="qwen3-0.6b", head_dim=16),  # q/k norms, tied embeddings
}


def tiny_args(family: str = "llama", **overrides) -> ModelArgs:
    kw = dict(FAMILIES[family])
    base = kw.pop("base")
    kw.update(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, intermediate_size=128, vocab_size=96,
              max_position_embeddings=128)
    kw.update(overrides)
    return ModelArgs.from_name(base, **kw)


def hf_model(args: ModelArgs, seed: int = 0):
    """A random HF transformers model of ``args`` (every parameter random, norms included)."""
    cfg = args.to_hf_config()
    config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def hf_tensors(model, args: ModelArgs) -> dict[str, torch.Tensor]:
    """The HF state dict as save_pretrained writes it (tied lm_head left out)."""
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        sd.pop("lm_head.weight", None)
    return sd


def write_checkpoint(d: Path, args: ModelArgs, tensors: dict[str, torch.Tensor], shards: int = 1) -> Path:
    """config.json + model.safetensors, or ``shards`` files with a model.safetensors.index.json."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(args.to_hf_config()))
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"))
        return d
    names = list(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, str(d / fname))
        weight_map.update({n: fname for n in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


def expected_pairs(hf, args: ModelArgs) -> dict[str, torch.Tensor]:
    """zmzoo name -> the HF module's tensor, spelled out module by module (independent of HF_TO_ZMZOO)."""
    m = hf.model
    out = {"tok_embeddings.weight": m.embed_tokens.weight, "norm.weight": m.norm.weight}
    if not args.tie_embeddings:
        out["output.weight"] = hf.lm_head.weight
    for i, layer in enumerate(m.layers):
        a, mlp = layer.self_attn, layer.mlp
        p = f"layers.{i}."
        out |= {p + "attention_norm.weight": layer.input_layernorm.weight,
                p + "ffn_norm.weight": layer.post_attention_layernorm.weight,
                p + "attention.wq.weight": a.q_proj.weight, p + "attention.wk.weight": a.k_proj.weight,
                p + "attention.wv.weight": a.v_proj.weight, p + "attention.wo.weight": a.o_proj.weight,
                p + "feed_forward.w1.weight": mlp.gate_proj.weight, p + "feed_forward.w2.weight": mlp.down_proj.weight,
                p + "feed_forward.w3.weight": mlp.up_proj.weight}
        if args.qkv_bias:
            out |= {p + "attention.wq.bias": a.q_proj.bias, p + "attention.wk.bias": a.k_proj.bias,
                    p + "attention.wv.bias": a.v_proj.bias}
        if args.qk_norm:
            out |= {p + "attention.q_norm.weight": a.q_norm.weight, p + "attention.k_norm.weight": a.k_norm.weight}
    return out


def zmzoo_logits(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    model.setup_caches([SDPACache() for _ in model.layers], max_seq_len=tokens.shape[1])
    with torch.no_grad():
        return model.prefill(tokens, all_logits=True)


def build(args: ModelArgs, sd, source: str = "test") -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    load_weights_into(model, sd, source)
    return model.eval()


def load_dir(d: Path, args: ModelArgs, dtype=torch.float32):
    return load_safetensors_state_dict(find_safetensors(d), args, dtype)


# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(FAMILIES))
def test_load_matches_written_and_logits_match_hf(tmp_path, family):
    args = tiny_args(family)
    hf = hf_model(args)
    d = write_checkpoint(tmp_path / "ckpt", args, hf_tensors(hf, args))
    sd = load_dir(d, args)
    want = expected_pairs(hf, args)
    assert set(sd) == set(want)
    for name, t in want.items():
        assert torch.equal(sd[name], t.detach()), name
    model = build(args, sd)
    if args.tie_embeddings:
        assert model.output.weight is model.tok_embeddings.weight
    tokens = torch.randint(0, args.vocab_size, (1, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens).logits
    torch.testing.assert_close(zmzoo_logits(model, tokens), ref, rtol=1e-4, atol=1e-4)


def test_sharded_equals_single_file(tmp_path):
    args = tiny_args("qwen2")
    tensors = hf_tensors(hf_model(args), args)
    single = load_dir(write_checkpoint(tmp_path / "one", args, tensors), args)
    files = find_safetensors(write_checkpoint(tmp_path / "three", args, tensors, shards=3))
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    sharded = load_safetensors_state_dict(files, args, torch.float32)
    assert set(single) == set(sharded)
    for name in single:
        assert torch.equal(single[name], sharded[name]), name
    assert "model-00002-of-00003.safetensors" in " ".join(sharded.sources.values())


def test_dtype_conversion(tmp_path):
    args = tiny_args()
    tensors = hf_tensors(hf_model(args), args)
    sd = load_dir(write_checkpoint(tmp_path, args, tensors), args, dtype=torch.bfloat16)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    torch.testing.assert_close(sd["layers.1.attention.wk.weight"],
                               tensors["model.layers.1.self_attn.k_proj.weight"].bfloat16(), rtol=0, atol=0)


def _check_error(d: Path, args: ModelArgs, match: str | None = None) -> str:
    """The error of loading checkpoint ``d`` into a model of ``args``, as the loader's StateDict names things."""
    sd = load_dir(d, args)
    assert sd.checkpoint == str(d) and sd.format == "safetensors"
    with torch.device("meta"):
        model = Transformer(args)
    with pytest.raises(ValueError, match=match) as e:
        load_weights_into(model, sd)
    return str(e.value)


def test_missing_tensor_names_tensor_and_source(tmp_path):
    args = tiny_args()
    tensors = hf_tensors(hf_model(args), args)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    d = write_checkpoint(tmp_path / "ckpt", args, tensors, shards=2)
    _check_error(d, args, match=r"missing tensor 'layers\.1\.feed_forward\.w3\.weight' \(HF "
                                r"'model\.layers\.1\.mlp\.up_proj\.weight'\): not in " + re.escape(str(d)))


def test_unexpected_tensor_names_tensor_and_file(tmp_path):
    args = tiny_args()
    tensors = hf_tensors(hf_model(args), args)
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(3, 3)
    tensors["model.layers.7.mlp.up_proj.weight"] = torch.zeros(128, 64)  # a layer the config does not have
    d = write_checkpoint(tmp_path / "ckpt", args, tensors, shards=2)
    msg = _check_error(d, args)
    index = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"]
    assert re.search(r"unexpected tensor 'model.layers.0.mlp.extra_proj.weight' in \S*"
                     + re.escape(index["model.layers.0.mlp.extra_proj.weight"]), msg)
    assert re.search(r"unexpected tensor 'layers.7.feed_forward.w3.weight' in \S*"
                     + re.escape(index["model.layers.7.mlp.up_proj.weight"])
                     + r" \('model.layers.7.mlp.up_proj.weight'\)", msg)


def test_misshaped_tensor_names_tensor_file_and_shapes(tmp_path):
    args = tiny_args()
    tensors = hf_tensors(hf_model(args), args)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)  # 4 KV heads' worth, config says 2
    d = write_checkpoint(tmp_path / "ckpt", args, tensors, shards=2)
    fname = json.loads((d / "model.safetensors.index.json").read_text())["weight_map"][
        "model.layers.0.self_attn.k_proj.weight"]
    _check_error(d, args, match=r"tensor 'layers\.0\.attention\.wk\.weight' in " + re.escape(str(d / fname))
                 + r" \('model\.layers\.0\.self_attn\.k_proj\.weight'\) has shape \(64, 64\), the model "
                   r"expects \(32, 64\)")


def _tiny_dir(tmp_path: Path) -> tuple[Path, Path]:
    args = tiny_args()
    d = write_checkpoint(tmp_path / "ckpt", args, hf_tensors(hf_model(args), args))
    return d, d / "model.safetensors"


def test_truncated_safetensors_names_the_file(tmp_path):
    d, f = _tiny_dir(tmp_path)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    want = (re.escape(str(f)) + rf" is truncated: its header describes {len(data)} bytes, the file has "
            rf"{len(data) // 2} \({len(data) - len(data) // 2} missing\)\. Delete it and download it again")
    with pytest.raises(CheckpointError, match=want) as e:
        zmzoo.load(str(d), compile=False, device="cpu")
    assert isinstance(e.value.__cause__, SafetensorError)  # the original error, chained
    f.write_bytes(data[:100])  # cut inside the header
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + r" is truncated: its header alone takes \d+ bytes, "
                                              r"the file has 100"):
        load_dir(d, tiny_args())


def test_garbage_safetensors_names_the_file(tmp_path):
    d, f = _tiny_dir(tmp_path)
    f.write_bytes(b"<!DOCTYPE html><html><body>404 Not Found</body></html>")  # a saved error page
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + r" is not a safetensors file: its first 8 bytes"):
        zmzoo.load(str(d), compile=False, device="cpu")
    header = b"{not json at all}"
    f.write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + r" has a corrupt header"):
        load_dir(d, tiny_args())
    f.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 99\n")
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + r" is a Git LFS pointer file"):
        load_dir(d, tiny_args())
    f.write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(str(f)) + r" is truncated or not a safetensors file: it "
                                              r"has only 0 bytes"):
        load_dir(d, tiny_args())


def test_progress_bar_names_each_file(tmp_path, capsys):
    args = tiny_args()
    d = write_checkpoint(tmp_path / "ckpt", args, hf_tensors(hf_model(args), args), shards=2)
    load_safetensors_state_dict(find_safetensors(d), args, torch.float32)
    assert "safetensors" not in capsys.readouterr().err
    load_safetensors_state_dict(find_safetensors(d), args, torch.float32, progress=True)
    err = capsys.readouterr().err
    assert "model-00001-of-00002.safetensors" in err and "model-00002-of-00002.safetensors" in err


def test_bias_mismatch_hint(tmp_path):
    args = tiny_args("qwen2")
    d = write_checkpoint(tmp_path, args, hf_tensors(hf_model(args), args))
    msg = _check_error(d, args.replace(qkv_bias=False))
    assert "unexpected tensor 'layers.0.attention.wq.bias'" in msg and "qkv_bias" in msg


def test_index_with_missing_shard(tmp_path):
    args = tiny_args()
    d = write_checkpoint(tmp_path, args, hf_tensors(hf_model(args), args), shards=2)
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        find_safetensors(d)


def test_pickle_only_dir_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_args().to_hf_config()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="never unpickles") as e:
        find_safetensors(tmp_path)
    assert "pytorch_model.bin" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        find_safetensors(tmp_path / "empty")


def test_rotary_inv_freq_is_ignored(tmp_path):
    args = tiny_args()
    tensors = hf_tensors(hf_model(args), args)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    sd = load_dir(write_checkpoint(tmp_path, args, tensors), args)
    assert not any("inv_freq" in k for k in sd)
    with torch.device("meta"):
        check_state_dict(sd, Transformer(args), str(tmp_path))


def test_tied_checkpoint_with_lm_head(tmp_path):
    args = tiny_args("qwen2")
    assert args.tie_embeddings
    tensors = hf_tensors(hf_model(args), args)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sd = load_dir(write_checkpoint(tmp_path / "same", args, tensors), args)  # equal: dropped silently
    assert "output.weight" not in sd
    build(args, sd)
    tensors["lm_head.weight"] = tensors["lm_head.weight"] + 1
    with pytest.warns(UserWarning, match="lm_head.weight.*differs from the embedding"):
        sd = load_dir(write_checkpoint(tmp_path / "differs", args, tensors), args)
    assert "output.weight" not in sd
    # an untied model keeps its lm_head, even when it equals the embedding
    untied = args.replace(tie_embeddings=False)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    sd = load_dir(write_checkpoint(tmp_path / "untied", untied, tensors), untied)
    model = build(untied, sd)
    assert model.output.weight is not model.tok_embeddings.weight


def test_untied_checkpoint_without_lm_head_hints_at_tying(tmp_path):
    args = tiny_args("qwen2")
    d = write_checkpoint(tmp_path, args, hf_tensors(hf_model(args), args))
    msg = _check_error(d, args.replace(tie_embeddings=False))
    assert "missing tensor 'output.weight'" in msg and "tie_word_embeddings" in msg


def test_name_map_covers_every_parameter():
    for family in FAMILIES:
        args = tiny_args(family, tie_embeddings=False)
        with torch.device("meta"):
            names = list(Transformer(args).state_dict())
        for name in names:
            hf = zmzoo_to_hf_name(name)
            assert hf is not None, name
            assert hf_to_zmzoo_name(hf) == name
    assert hf_to_zmzoo_name("model.layers.12.mlp.down_proj.weight") == "layers.12.feed_forward.w2.weight"
    assert hf_to_zmzoo_name("model.layers.3.mlp.unknown.weight") is None
    assert len(set(HF_TO_ZMZOO.values())) == len(HF_TO_ZMZOO)


def test_no_pickle_loading_in_package():
    root = Path(__file__).resolve().parents[2] / "zmzoo"
    for f in root.rglob("*.py"):
        text = f.read_text()
        assert "torch.load" not in text, f
        assert not re.search(r"^\s*(import pickle|from pickle)", text, re.M), f

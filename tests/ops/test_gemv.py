"""Triton GEMV against ``F.linear`` (Triton's interpreter on CPU, see conftest.py): odd sizes, 1-4 rows, bias or
not, strided inputs; low-precision error against fp32 at most twice that of torch's own product in that dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zmzoo.ops.gemv as gemv_mod
from zmzoo.ops.gemv import CANDIDATES, MAX_ROWS, Config, for_rows, gemv, gemv_ref, tune


def inputs(m, n, k, dtype, *, bias, seed=0, strided_x=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k + 3 if strided_x else k, generator=g)
    x = x[:, 1 : 1 + k] if strided_x else x  # rows with a stride larger than K
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    return x.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(1, 1), (17, 33), (130, 257), (64, 1000)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_fp32_matches_linear(m, n, k, bias):
    x, w, b = inputs(m, n, k, torch.float32, bias=bias, seed=m * 1000 + n + k, strided_x=m > 1)
    got = gemv(x, w, b, backend="triton")
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_low_precision_error_at_most_twice_torch(dtype, m):
    x, w, b = inputs(m, 96, 1100, dtype, bias=True, seed=7)
    exact = F.linear(x.double(), w.double(), b.double())
    err_torch = (gemv_ref(x, w, b).double() - exact).abs().max().item()
    err_ours = (gemv(x, w, b, backend="triton").double() - exact).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)


def test_gemv_leading_dims_and_fallback():
    """(B, 1, K) inputs as a decode step has them keep their shape; more than MAX_ROWS rows fall back to F.linear."""
    x, w, _ = inputs(3, 40, 50, torch.float32, bias=False)
    got = gemv(x.view(3, 1, 50), w, backend="triton")
    assert got.shape == (3, 1, 40)
    torch.testing.assert_close(got, F.linear(x.view(3, 1, 50), w), rtol=1e-5, atol=1e-5)
    big, w2, _ = inputs(MAX_ROWS + 1, 8, 16, torch.float32, bias=False)
    assert torch.equal(gemv(big, w2, backend="triton"), F.linear(big, w2))


@pytest.mark.parametrize("cfg", CANDIDATES, ids=lambda c: "n{}k{}w{}s{}".format(*c))
@pytest.mark.parametrize("m", [1, 3])
def test_gemv_every_tuning_candidate_matches_linear(cfg, m):
    """Whatever setting tune() picks on a GPU computes the same product (K not a multiple of BLOCK_K, N not of
    BLOCK_N)."""
    x, w, b = inputs(m, 37, 300, torch.float32, bias=True, seed=m)
    got = gemv(x, w, b, backend="triton", config=for_rows(cfg, m))
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_gemv_auto_follows_the_tuned_choice(monkeypatch):
    """backend="auto" runs F.linear where tune() found it faster (or did not tune: CPU), the kernel where the kernel
    won; backend="triton" runs the kernel's best setting even where F.linear won."""
    x, w, _ = inputs(1, 24, 40, torch.float32, bias=False)
    calls = []
    monkeypatch.setattr(gemv_mod, "gemv_ref", lambda *a: calls.append("linear") or F.linear(*a))
    assert tune([w]) == {}  # CPU: nothing to time
    gemv(x, w, backend="auto")
    assert calls == ["linear"]
    key = gemv_mod._key(1, w)
    fast, slow = Config(8, 64, 1, 2), Config(4, 32, 1, 2)
    monkeypatch.setitem(gemv_mod._TIMES, key, {"F.linear": 1e-6, fast: 2e-6, slow: 3e-6})
    monkeypatch.setitem(gemv_mod._TUNED, key, (None, fast))
    calls.clear()
    gemv(x, w, backend="auto")
    triton_out = gemv(x, w, backend="triton")
    assert calls == ["linear"]
    torch.testing.assert_close(triton_out, gemv(x, w, backend="triton", config=fast), rtol=0, atol=0)
    monkeypatch.setitem(gemv_mod._TUNED, key, (fast, fast))
    calls.clear()
    torch.testing.assert_close(gemv(x, w, backend="auto"), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert calls == []


def test_gemv_bad_inputs_are_named():
    x, w, b = inputs(1, 8, 16, torch.float32, bias=True)
    with pytest.raises(ValueError, match="do not match"):
        gemv(x, w[:, :8], backend="triton")
    with pytest.raises(ValueError, match="do not match"):
        gemv(x, w, b[:4], backend="triton")
    with pytest.raises(TypeError, match="one dtype"):
        gemv(x, w.double(), backend="triton")
    with pytest.raises(ValueError, match="unit stride"):
        gemv(x, torch.randn(16, 8).t(), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        gemv(x, w, backend="cublas")


def test_generator_with_triton_gemv_equals_torch():
    """The decode step's products through the kernel (Transformer.set_gemv): the same greedy tokens as F.linear over
    24 ZeroMerge steps in fp32, and the same teacher-forced logits; prompts (many rows) keep F.linear."""
    import zmzoo
    from tests.conftest import TINY

    kw = dict(weights="random", args_overrides={**TINY, "max_position_embeddings": 128}, device="cpu",
              dtype=torch.float32, compile=False, max_seq_len=96, kv_budget=16, ops="triton")
    ref, got = zmzoo.load("llama2-7b", **kw), zmzoo.load("llama2-7b", **kw)
    got.model.set_gemv("triton")
    prompt = list(range(3, 40))
    assert got.generate(prompt, max_new_tokens=24, return_ids=True) == ref.generate(prompt, max_new_tokens=24,
                                                                                      return_ids=True)
    p, c = list(range(5, 30)), list(range(40, 52))
    torch.testing.assert_close(got.score(p, c), ref.score(p, c), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="gemv backend"):
        got.model.set_gemv("cublas")

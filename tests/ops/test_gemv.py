"""Triton GEMV against ``F.linear`` (Triton's interpreter on CPU, see conftest.py): odd sizes, 1-4 rows, bias or
not, strided inputs; low-precision error against fp32 at most twice that of torch's own product in that dtype."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from zmzoo.ops.gemv import CANDIDATES, MAX_ROWS, Config, Split, for_rows, gemv, gemv_ref, tune


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


def test_set_gemv_follows_the_models_tuning_table():
    """set_gemv("auto") gives a product the kernel where its model's tuning table found the kernel faster, the torch
    composition where torch won or nothing was timed (CPU); "triton" the kernel's best setting even where torch won
    (its default setting where untimed). The table is the model's own: another model in the process does not see it,
    and the decode step runs what the plans say."""
    import zmzoo
    from tests.conftest import TINY
    from zmzoo.ops.gemv import Tuned, gemv_config, tuning_key

    kw = dict(weights="random", args_overrides={**TINY, "max_position_embeddings": 128}, device="cpu",
              dtype=torch.float32, compile=False, max_seq_len=64, ops="triton", verbose=False)
    a, b = zmzoo.load("llama2-7b", **kw), zmzoo.load("llama2-7b", **kw)
    assert tune(a.model.decode_products()) == {}  # CPU: nothing to time
    products = a.model._products()
    _, _, w, fusion = products[0]  # layer 0's q|k|v with the RMSNorm inside
    key = tuning_key(1, w, fusion)
    same = {(id(o), n) for o, n, w_, f in products if tuning_key(1, w_, f) == key}  # every layer's q|k|v (and more)
    assert len(same) >= a.args.n_layers
    fast = Config(8, 64, 1, 2)
    a.model.gemv_tuning[key] = Tuned(None, fast, {"torch": 1e-6, fast: 2e-6})
    a.model.set_gemv("auto")
    assert all(owner.gemv_plan[name] is None for owner, name, _, _ in products)
    a.model.set_gemv("triton")
    plans = {(id(o), n): o.gemv_plan[n] for o, n, _, _ in products}
    assert {p for i, p in plans.items() if i in same} == {fast}
    assert {p for i, p in plans.items() if i not in same} == {gemv_config(1)}
    a.model.gemv_tuning[key] = Tuned(fast, fast, {"torch": 3e-6, fast: 2e-6})
    a.model.set_gemv("auto")
    assert {o.gemv_plan[n] for o, n, _, _ in products if (id(o), n) in same} == {fast}
    assert {o.gemv_plan[n] for o, n, _, _ in products if (id(o), n) not in same} == {None}
    b.model.set_gemv("auto")
    assert b.model.gemv_tuning == {} and {o.gemv_plan[n] for o, n, _, _ in b.model._products()} == {None}
    launched = []
    real = torch.ops.zmzoo.gemv

    def spy(x2, w_, *rest):
        launched.append((tuple(w_.shape), Config(*rest[-4:])))
        return real(x2, w_, *rest)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.ops.zmzoo, "gemv", spy)
        with torch.inference_mode():
            a.model.decode(torch.tensor([3]), torch.tensor([0]))
    assert launched == [(tuple(w.shape), fast)] * len(same)


# ZMZOO_TEST_DEVICE=cuda: the fused-product tests on a GPU (the kernel compiled; bench/h200.sh's tests stage)
DEVICE = os.environ.get("ZMZOO_TEST_DEVICE", "cpu")


def fused_inputs(m, n, k, dtype, *, bias, norm, silu, residual, seed=0):
    """x (m, 2k if silu else k) with a non-unit mean square, and the fusion arguments of ``gemv``, on DEVICE."""
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(m, 2 * k if silu else k, generator=g) + 0.5
    w = torch.randn(n, k, generator=g) / k**0.5
    extra = dict(b=torch.randn(n, generator=g) if bias else None,
                 norm=1 + 0.3 * torch.randn(k, generator=g) if norm else None,
                 residual=torch.randn(m, n, generator=g) if residual else None)
    return (x.to(DEVICE, dtype), w.to(DEVICE, dtype),
            {a: None if t is None else t.to(DEVICE, dtype) for a, t in extra.items()})


def exact_fused(x, w, b, norm, silu, residual, eps):
    """The fused product in fp64, no intermediate rounding."""
    x = x.double()
    if norm is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.double()
    if silu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = F.linear(x, w.double(), None if b is None else b.double())
    return y if residual is None else y + residual.double()


FUSIONS = [dict(norm=True, silu=False, residual=False), dict(norm=False, silu=True, residual=True),
           dict(norm=False, silu=False, residual=True), dict(norm=True, silu=False, residual=True),
           dict(norm=False, silu=True, residual=False)]


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n,k", [(1, 1), (17, 33), (130, 257), (64, 1000)])
@pytest.mark.parametrize("fusion", FUSIONS, ids=lambda f: "-".join(a for a, on in f.items() if on))
def test_fused_gemv_fp32_matches_the_composition(m, n, k, fusion):
    """RMSNorm prologue, SiLU-gate prologue, residual epilogue (as a decode step uses them) against ``gemv_ref``, the
    plain-torch rms_norm / silu_mul / F.linear / add; bias on where the norm is (Qwen's q|k|v)."""
    x, w, kw = fused_inputs(m, n, k, torch.float32, bias=fusion["norm"], seed=m * 7 + n + k, **fusion)
    kw |= dict(eps=1e-5, silu=fusion["silu"])
    b = kw.pop("b")
    got = gemv(x, w, b, backend="triton", **kw)
    torch.testing.assert_close(got, gemv_ref(x, w, b, **kw), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), exact_fused(x, w, b, kw["norm"], kw["silu"], kw["residual"], 1e-5),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fusion", FUSIONS, ids=lambda f: "-".join(a for a, on in f.items() if on))
def test_fused_gemv_low_precision_error_at_most_twice_torch(dtype, fusion):
    x, w, kw = fused_inputs(3, 96, 1100, dtype, bias=True, seed=11, **fusion)
    kw |= dict(eps=1e-6, silu=fusion["silu"])
    b = kw.pop("b")
    exact = exact_fused(x, w, b, kw["norm"], kw["silu"], kw["residual"], 1e-6)
    err_torch = (gemv_ref(x, w, b, **kw).double() - exact).abs().max().item()
    err_ours = (gemv(x, w, b, backend="triton", **kw).double() - exact).abs().max().item()
    assert err_ours <= 2 * err_torch + 1e-6, (err_ours, err_torch)


def test_fused_gemv_bad_inputs_are_named():
    x, w, kw = fused_inputs(2, 8, 16, torch.float32, bias=False, norm=True, silu=False, residual=True)
    with pytest.raises(ValueError, match="norm weight"):
        gemv(x, w, norm=kw["norm"][:5], backend="triton")
    with pytest.raises(ValueError, match="residual"):
        gemv(x, w, residual=kw["residual"][:, :3], backend="triton")
    with pytest.raises(ValueError, match="2K wide with silu"):
        gemv(x, w, silu=True, backend="triton")
    with pytest.raises(ValueError, match="pass one"):
        gemv(torch.cat([x, x], -1), w, norm=kw["norm"], silu=True, backend="triton")
    with pytest.raises(TypeError, match="residual torch.float64"):
        gemv(x, w, residual=kw["residual"].double(), backend="triton")


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
    """The decode step's products through the kernel (zmzoo.load's gemv="triton"; the RMSNorms, SiLU gate and
    residual adds inside it): the same greedy tokens as the torch composition over 24 ZeroMerge steps in fp32, and the
    same teacher-forced logits (greedy tokens up to the first near-tie); prompts (many rows) keep F.linear."""
    import zmzoo
    from tests.conftest import TINY

    kw = dict(weights="random", args_overrides={**TINY, "max_position_embeddings": 128}, device="cpu",
              dtype=torch.float32, compile=False, max_seq_len=96, kv_budget=16, ops="triton")
    from tests.conftest import assert_same_function

    ref, got = zmzoo.load("llama2-7b", **kw), zmzoo.load("llama2-7b", gemv="triton", **kw)
    assert (ref.model.gemv, got.model.gemv) == ("torch", "triton")  # "auto" on a CPU: nothing to time, torch
    assert all(p is not None for layer in got.model.layers for p in layer.feed_forward.gemv_plan.values())
    assert_same_function(ref, got, [list(range(3, 40))], 24, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="gemv backend"):
        got.model.set_gemv("cublas")
    with pytest.raises(ValueError, match="gemv='cublas' is not one of"):
        zmzoo.load("llama2-7b", gemv="cublas", **kw)
    with pytest.raises(RuntimeError, match="gemv='triton' on a CPU device"):
        zmzoo.load("llama2-7b", gemv="triton", **{**kw, "ops": "torch"})


def test_fused_gemv_auto_split_runs_the_silu_gate_apart(monkeypatch):
    """A ``Split`` choice: the SiLU gate computed by torch, the product and the residual add by the kernel at the
    split's setting with the gate off inside it; the composition's result (on DEVICE)."""
    m, n, k = 2, 24, 40
    x, w, extra = fused_inputs(m, n, k, torch.float32, bias=False, norm=False, silu=True, residual=True, seed=3)
    cfg = Config(8, 64, 1, 2)
    launched = []
    real = torch.ops.zmzoo.gemv

    def spy(x2, w_, b, norm, res, eps, silu, *c):
        launched.append((tuple(x2.shape), silu, Config(*c)))
        return real(x2, w_, b, norm, res, eps, silu, *c)

    monkeypatch.setattr(torch.ops.zmzoo, "gemv", spy)
    got = gemv(x, w, silu=True, residual=extra["residual"], backend="triton", config=Split(cfg))
    assert launched == [((m, k), False, cfg)]
    torch.testing.assert_close(got, gemv_ref(x, w, silu=True, residual=extra["residual"]), rtol=1e-5, atol=1e-5)

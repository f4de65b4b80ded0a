"""The quantized GEMV kernel (zmzoo/ops/qgemv.py) against its plain-torch reference (dequantize, then the gemv
composition), in Triton's interpreter on CPU: every layout, odd sizes (K not a multiple of the tile, N not of
BLOCK_N, a single output), 1 and 3 rows, every fusion, fp32 and low-precision activations (error against fp64 at most
twice the reference's), every launch setting tune() may pick."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tests.ops.test_quant import formats
from zmzoo.ops.gemv import CANDIDATES, MAX_ROWS, Config, Split, for_rows
from zmzoo.ops.qgemv import kernel_config, qgemv, qgemv_ref
from zmzoo.ops.quant import dequantize_ref, quantize_int8

DEVICE = os.environ.get("ZMZOO_TEST_DEVICE", "cpu")

FUSIONS = [dict(norm=False, silu=False, residual=False), dict(norm=True, silu=False, residual=False),
           dict(norm=False, silu=True, residual=True), dict(norm=False, silu=False, residual=True),
           dict(norm=True, silu=False, residual=True), dict(norm=False, silu=True, residual=False)]
FIDS = ["plain", "norm", "silu-residual", "residual", "norm-residual", "silu"]


def weights(n, k, seed=0):
    """``formats`` with rows of magnitude up to 10 / sqrt(K) (products of order 1 at any K)."""
    return {name: qt.map(lambda t: t.to(DEVICE)) for name, qt in formats(n, k, seed, gain=k**-0.5).items()}


def fused_inputs(m, n, k, dtype, *, norm, silu, residual, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(m, 2 * k if silu else k, generator=g) + 0.5
    kw = dict(b=torch.randn(n, generator=g) if bias else None,
              norm=1 + 0.3 * torch.randn(k, generator=g) if norm else None,
              residual=torch.randn(m, n, generator=g) if residual else None)
    return x.to(DEVICE, dtype), {a: None if t is None else t.to(DEVICE, dtype) for a, t in kw.items()}


def exact(x, qt, b, norm, silu, residual, eps):
    """The fused product in fp64 with the exactly dequantized weight."""
    x = x.double()
    if norm is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm.double()
    if silu:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = F.linear(x, dequantize_ref(qt).double(), None if b is None else b.double())
    return y if residual is None else y + residual.double()


NAMES = list(formats())


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("fusion", FUSIONS, ids=FIDS)
@pytest.mark.parametrize("name", NAMES)
def test_qgemv_fp32_matches_reference(name, fusion, m):
    """K = 192: six 32-column chunks, not a multiple of any BLOCK_K; N = 37; bias where the norm is (Qwen's q|k|v)."""
    qt = weights(37, 192, seed=m)[name]
    x, kw = fused_inputs(m, 37, 192, torch.float32, bias=fusion["norm"], seed=m, **fusion)
    b = kw.pop("b")
    got = qgemv(x, qt, b, backend="triton", eps=1e-5, silu=fusion["silu"], **kw)
    torch.testing.assert_close(got, qgemv_ref(x, qt, b, eps=1e-5, silu=fusion["silu"], **kw), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), exact(x, qt, b, kw["norm"], fusion["silu"], kw["residual"], 1e-5),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n,k", [(1, 1), (3, 257), (130, 1000)])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_qgemv_int8_per_channel_odd_sizes(n, k, m):
    """int8 per channel takes any K (one scale a row): K = 1, 257, 1000; N = 1, 3, 130; x rows strided (a view with
    a row stride larger than K)."""
    g = torch.Generator().manual_seed(n + k + m)
    qt = quantize_int8(torch.randn(n, k, generator=g) / k**0.5).map(lambda t: t.to(DEVICE))
    x = torch.randn(m, k + 3, generator=g).to(DEVICE)[:, 1 : 1 + k]
    torch.testing.assert_close(qgemv(x, qt, backend="triton"), qgemv_ref(x, qt), rtol=1e-5, atol=1e-5)


LOW_NAMES = ("int8-row", "int8-g32", "int4-sym-g32", "int4-g64")
LOW = ([(torch.bfloat16, f, n) for f in range(len(FUSIONS)) for n in LOW_NAMES]
       + [(torch.float16, f, n) for f in (1, 2) for n in ("int8-row", "int4-g64")])


@pytest.mark.parametrize("dtype,fusion,name", LOW, ids=lambda v: FIDS[v] if isinstance(v, int) else str(v))
def test_qgemv_low_precision_error_at_most_twice_reference(name, fusion, dtype):
    """In bf16 (every fusion) and fp16 the kernel (fp32 inside, one rounding) is at most twice as far from fp64 as
    the reference (the weight rounded to the activations' dtype, then torch's product in that dtype), 3 rows."""
    fusion = FUSIONS[fusion]
    qt = weights(48, 320, seed=5)[name]
    x, kw = fused_inputs(3, 48, 320, dtype, bias=True, seed=11, **fusion)
    b = kw.pop("b")
    want = exact(x, qt, b, kw["norm"], fusion["silu"], kw["residual"], 1e-6)
    err_ref = (qgemv_ref(x, qt, b, silu=fusion["silu"], **kw).double() - want).abs().max().item()
    err = (qgemv(x, qt, b, backend="triton", silu=fusion["silu"], **kw).double() - want).abs().max().item()
    assert err <= 2 * err_ref + 1e-6, (err, err_ref)


@pytest.mark.parametrize("cfg", CANDIDATES, ids=lambda c: "n{}k{}w{}s{}".format(*c))
@pytest.mark.parametrize("m", [1, 3])
def test_qgemv_every_tuning_candidate(cfg, m):
    """Whatever setting tune() picks (at this row count; 4 bits with BLOCK_K raised to a nibble chunk pair) computes
    the same product, for int8 per channel and int4 per 64."""
    ws = weights(37, 320, seed=7)
    x, kw = fused_inputs(m, 37, 320, torch.float32, norm=True, silu=False, residual=True, seed=m)
    for name in ("int8-row", "int4-g64"):
        c = kernel_config(for_rows(cfg, m), ws[name].bits)
        got = qgemv(x, ws[name], backend="triton", config=c, **kw)
        torch.testing.assert_close(got, qgemv_ref(x, ws[name], **kw), rtol=1e-5, atol=1e-5)


def test_qgemv_split_leading_dims_and_fallback(monkeypatch):
    """A ``Split``: the SiLU gate by torch, the kernel without it; (B, 1, K) inputs keep their shape; more than
    MAX_ROWS rows run the reference."""
    qt = weights(24, 64)["int4-g32"]
    x, kw = fused_inputs(2, 24, 64, torch.float32, norm=False, silu=True, residual=True, seed=3)
    launched = []
    real = torch.ops.zmzoo.qgemv

    def spy(x2, *rest):
        launched.append((tuple(x2.shape), rest[7]))  # (rows, width), silu
        return real(x2, *rest)

    monkeypatch.setattr(torch.ops.zmzoo, "qgemv", spy)
    got = qgemv(x.view(2, 1, -1), qt, silu=True, residual=kw["residual"].view(2, 1, -1), backend="triton",
                config=Split(Config(8, 64, 1, 2)))
    assert launched == [((2, 64), False)] and got.shape == (2, 1, 24)
    torch.testing.assert_close(got.view(2, 24), qgemv_ref(x, qt, silu=True, residual=kw["residual"]),
                               rtol=1e-5, atol=1e-5)
    big = torch.randn(MAX_ROWS + 1, 64).to(DEVICE)
    assert torch.equal(qgemv(big, qt, backend="triton"), qgemv_ref(big, qt)) and len(launched) == 1


def test_qgemv_bad_inputs_are_named():
    qt = weights(8, 64)["int4-g32"]
    x, kw = fused_inputs(2, 8, 64, torch.float32, norm=True, silu=False, residual=True)
    with pytest.raises(ValueError, match="do not match"):
        qgemv(x[:, :32], qt, backend="triton")
    with pytest.raises(ValueError, match="norm weight"):
        qgemv(x, qt, norm=kw["norm"][:5], backend="triton")
    with pytest.raises(ValueError, match="residual"):
        qgemv(x, qt, residual=kw["residual"][:, :3], backend="triton")
    with pytest.raises(ValueError, match="pass one"):
        qgemv(torch.cat([x, x], -1), qt, norm=kw["norm"], silu=True, backend="triton")
    with pytest.raises(TypeError, match="residual torch.float64"):
        qgemv(x, qt, residual=kw["residual"].double(), backend="triton")
    with pytest.raises(ValueError, match="backend"):
        qgemv(x, qt, backend="cublas")

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
from zmzoo.ops.gemv import CANDIDATES, MAX_ROWS, Config, Split, for_rows, gemv
from zmzoo.ops.qgemv import (
    INT4_CANDIDATES,
    INT8_CANDIDATES,
    candidates,
    kernel_config,
    qgemv,
    qgemv_config,
    qgemv_ref,
)
from zmzoo.ops.quant import QTensor, dequantize_ref, pack_int4, quantize_int8

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


def cid(c):
    return "n{}k{}w{}s{}".format(*c) + (f"x{c.split}" if c.split > 1 else "")


@pytest.mark.parametrize("cfg", sorted(set(CANDIDATES) | set(INT4_CANDIDATES) | set(INT8_CANDIDATES)), ids=cid)
@pytest.mark.parametrize("m", [1, 3])
def test_qgemv_every_tuning_candidate(cfg, m):
    """Whatever setting tune() picks (at this row count) computes the same product, for int8 per channel
    (``INT8_CANDIDATES``) and int4 per 64 (``INT4_CANDIDATES``), each run at every setting of all three lists (the
    dense kernel's too)."""
    ws = weights(37, 320, seed=7)
    x, kw = fused_inputs(m, 37, 320, torch.float32, norm=True, silu=False, residual=True, seed=m)
    for name in ("int8-row", "int4-g64"):
        c = kernel_config(for_rows(cfg, m), ws[name].bits)
        got = qgemv(x, ws[name], backend="triton", config=c, **kw)
        torch.testing.assert_close(got, qgemv_ref(x, ws[name], **kw), rtol=1e-5, atol=1e-5)


def int4_weight(n, k, group, zero, seed=0):
    """A random 4-bit weight of any group (a multiple of 32 dividing K, not only quantize_int4's 32 / 64 / 128), with
    rows of magnitude up to about 1 / sqrt(K): fp16 scales (and zeros, the asymmetric form) of their own."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), generator=g)
    scale = ((0.5 + torch.rand(n, k // group, generator=g)) / (8 * k**0.5)).half()
    z = (-8 * scale.float() * (0.8 + 0.4 * torch.rand(n, k // group, generator=g))).half() if zero else None
    return QTensor(pack_int4(q), scale, z, group, 4).map(lambda t: t.to(DEVICE))


# (K, group): groups of 32 / 64 / 128 (zmzoo's int4, GGUF's 32), K a multiple of the group but not of BLOCK_K; a
# group larger than a tile's columns (128 against BLOCK_K 64: one group over two tiles); a group that is not a
# power of two (96: the kernel's sub-blocks of 32 columns); one scale a row (group = K = 192)
INT4_SHAPES = [(192, 32), (224, 32), (192, 64), (448, 64), (384, 128), (640, 128), (288, 96), (192, 192)]
INT4_CONFIGS = [(Config(8, 64, 1, 1), (1, 2, 3, 4)), (qgemv_config(1, 4), (1, 3)), (Config(64, 1024, 8, 1), (1, 4))]


@pytest.mark.parametrize("zero", [True, False], ids=["zero", "nozero"])
@pytest.mark.parametrize("k,group", INT4_SHAPES, ids=lambda v: str(v))
def test_qgemv_int4_groups_and_sizes(k, group, zero):
    """The int4 kernel against the reference at every group size, with and without a zero (Q4_1 and Q4_0 forms), at
    K a multiple of BLOCK_K (the loop without column masks) or not, N = 37 (not a multiple of BLOCK_N), 1 to 4 rows,
    small and large tiles (BLOCK_K 64 to 1024, shrunk for more rows as tune() does)."""
    qt = int4_weight(37, k, group, zero, seed=k + group)
    for cfg, rows in INT4_CONFIGS:
        for m in rows:
            x, _ = fused_inputs(m, 37, k, torch.float32, norm=False, silu=False, residual=False, seed=m)
            got = qgemv(x, qt, backend="triton", config=kernel_config(for_rows(cfg, m), 4))
            torch.testing.assert_close(got, qgemv_ref(x, qt), rtol=1e-5, atol=1e-5,
                                       msg=lambda e, m=m, c=cfg: f"{m} rows {c}: {e}")


@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("fusion", FUSIONS, ids=FIDS)
def test_qgemv_int4_fusions_even_k(fusion, m):
    """Every fusion where K is a multiple of BLOCK_K (the loop without column masks), group 64 with a zero and
    group 32 without, bias on the norm products; 1, 2 and 4 rows."""
    for group, zero in ((64, True), (32, False)):
        qt = int4_weight(37, 256, group, zero, seed=m)
        x, kw = fused_inputs(m, 37, 256, torch.float32, bias=fusion["norm"], seed=m, **fusion)
        b = kw.pop("b")
        want = qgemv_ref(x, qt, b, eps=1e-5, silu=fusion["silu"], **kw)
        for cfg in (Config(8, 64, 1, 1), Config(16, 256, 2, 1)):
            got = qgemv(x, qt, b, backend="triton", eps=1e-5, silu=fusion["silu"], config=for_rows(cfg, m), **kw)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_qgemv_int4_unaligned_rows():
    """Packed rows that are not 4-byte aligned (a view into a wider buffer: the kernel reads int32 words, so it
    copies them) give the same product as contiguous ones."""
    qt = int4_weight(21, 192, 64, True, seed=3)
    wide = torch.zeros(21, 96 + 1, dtype=torch.uint8, device=qt.q.device)
    wide[:, 1:] = qt.q
    view = qt._replace(q=wide[:, 1:])
    assert view.q.storage_offset() % 4 and view.q.stride(0) % 4
    x, _ = fused_inputs(2, 21, 192, torch.float32, norm=False, silu=False, residual=False, seed=2)
    torch.testing.assert_close(qgemv(x, view, backend="triton"), qgemv_ref(x, qt), rtol=1e-5, atol=1e-5)


def test_quantized_candidates_and_default():
    """4-bit weights tune over ``INT4_CANDIDATES``, 8-bit ones over ``INT8_CANDIDATES``, and run ``qgemv_config``
    untuned (one of them, shrunk for more rows); the inputs' tile of a step stays smaller than a program's threads
    (no trip through shared memory, see the lists' comments)."""
    assert candidates(4) == INT4_CANDIDATES and candidates(8) == INT8_CANDIDATES
    assert qgemv_config(1, 4) in INT4_CANDIDATES and qgemv_config(1, 8) in INT8_CANDIDATES
    assert qgemv_config(4, 4).block_k == qgemv_config(1, 4).block_k // 4
    assert all(c.block_k // 8 < 32 * c.num_warps for c in INT4_CANDIDATES)
    assert all(c.block_k // 4 < 32 * c.num_warps for c in INT8_CANDIDATES)


SPLIT_CASES = [(2, Config(8, 64, 1, 1, 2)), (3, Config(16, 64, 2, 1, 3)), (1, Config(8, 64, 1, 1, 4)),
               (4, Config(16, 128, 4, 1, 16))]


@pytest.mark.parametrize("fusion", [FUSIONS[4], FUSIONS[5], FUSIONS[0]], ids=["norm-residual", "silu", "plain"])
@pytest.mark.parametrize("m,cfg", SPLIT_CASES, ids=lambda v: cid(v) if isinstance(v, Config) else str(v))
def test_qgemv_split_k(m, cfg, fusion):
    """K cut into ranges (``Config.split``), the partial sums added by the second kernel, for every layout: K = 448
    (7 tiles of 64: ranges of 4 + 3, 3 + 3 + 1, 2 + 2 + 2 + 1; at BLOCK_K 128 a range a tile, 4 of the 16 asked for,
    the last one half outside K), N = 37, 1 to 4 rows, bias on the plain product; the norm's squares and the rows'
    scales applied once, after the sum."""
    ws = weights(37, 448, seed=m)
    x, kw = fused_inputs(m, 37, 448, torch.float32, bias=not (fusion["norm"] or fusion["silu"]), seed=m, **fusion)
    b = kw.pop("b")
    for name, qt in ws.items():
        got = qgemv(x, qt, b, backend="triton", eps=1e-5, silu=fusion["silu"], config=kernel_config(cfg, qt.bits),
                    **kw)
        torch.testing.assert_close(got, qgemv_ref(x, qt, b, eps=1e-5, silu=fusion["silu"], **kw), rtol=1e-5,
                                   atol=1e-5, msg=lambda e, n=name: f"{n}: {e}")


def test_qgemv_int8_words_unaligned_rows_and_strides():
    """int8 rows read as int32 words: a view whose rows are not 4-byte aligned is copied first, the same product as
    contiguous rows; K = 1000 (a multiple of 4, not of BLOCK_K: the sub-blocks of gcd(K, BLOCK_K) = 8 columns)."""
    g = torch.Generator().manual_seed(4)
    qt = quantize_int8(torch.randn(13, 1000, generator=g) / 1000**0.5).map(lambda t: t.to(DEVICE))
    wide = torch.zeros(13, 1003, dtype=torch.int8, device=qt.q.device)
    wide[:, 3:] = qt.q
    view = qt._replace(q=wide[:, 3:])
    assert view.q.storage_offset() % 4 and view.q.stride(0) % 4
    x, _ = fused_inputs(3, 13, 1000, torch.float32, norm=False, silu=False, residual=False, seed=2)
    for cfg in (Config(8, 256, 2, 1), Config(16, 512, 4, 1, 2)):
        torch.testing.assert_close(qgemv(x, view, backend="triton", config=cfg), qgemv_ref(x, qt), rtol=1e-5,
                                   atol=1e-5)


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


@pytest.mark.parametrize("name", ["int8-row", "int4-g64"])
def test_qgemv_norm_split(name):
    """A ``Split`` of a norm product: the RMSNorm by torch, the kernel without it (and with a split K), within the
    reference's tolerance; the dense kernel refuses a split K by name."""
    qt = weights(24, 256)[name]
    x, kw = fused_inputs(3, 24, 256, torch.float32, norm=True, silu=False, residual=True, bias=True, seed=5)
    want = qgemv_ref(x, qt, eps=1e-5, **kw)
    for cfg in (Split(Config(8, 64, 1, 1)), Split(Config(16, 64, 2, 1, 3))):
        torch.testing.assert_close(qgemv(x, qt, backend="triton", eps=1e-5, config=cfg, **kw), want, rtol=1e-5,
                                   atol=1e-5)
    with pytest.raises(ValueError, match="does not split K"):
        gemv(x, dequantize_ref(qt), backend="triton", config=Config(8, 64, 1, 1, 2))


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
    with pytest.raises(ValueError, match="fuse=1, which only qgemv_a8 has"):
        qgemv(x, qt, backend="triton", config=Config(16, 64, 4, 1, 1, 1))

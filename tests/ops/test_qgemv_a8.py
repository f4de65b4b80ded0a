"""Products of quantized weights by int8 activations (zmzoo/ops/qgemv_a8.py), in Triton's interpreter on CPU (the GPU
runs the same tests with ``ZMZOO_TEST_DEVICE=cuda``, there through the ``dp4a`` instruction):

- the activation quantization kernel against ``quantize_act_ref`` (the same integers but for a rare rounding flip
  where the SiLU's exp differs in its last bit);
- the product kernel against the plain-torch product of the same quantized activations (``qgemv_a8_from``), every
  weight layout (int8 per channel, Q8_0, Q4_0, int4 per 32 and 64), every fusion, 1 and 3 rows, odd N, K not a
  multiple of the tile, split over K, full tiles (no masks), every launch setting ``gemv.tune`` may pick;
- the fused kernel (``Config.fuse``: the activations quantized inside the product) in all of those cases, against
  the unfused kernel at the same setting (``same_as_unfused``: bit for bit in the interpreter) and the same
  references;
- both against the exact product (fp64, exact activations): within ``a8_error_bound`` (the activations' rounding,
  summed at its worst) plus the output's rounding, in fp32 and in bf16;
- the errors a bad width or setting gets."""

from __future__ import annotations

import os

import pytest
import torch

import zmzoo.ops.qgemv_a8 as A8
from tests.ops.test_qgemv import FIDS, FUSIONS, exact, fused_inputs, weights
from tests.ops.test_quant import formats
from zmzoo.ops.gemv import Config, for_rows
from zmzoo.ops.qgemv_a8 import (
    A8_INT4_CANDIDATES,
    A8_INT8_CANDIDATES,
    ACT_BLOCK,
    a8_config,
    a8_error_bound,
    a8_kernel_config,
    check_act_quant,
    qgemv_a8,
    qgemv_a8_from,
    qgemv_a8_ref,
    quantize_act,
    quantize_act_ref,
)
from zmzoo.ops.quant import quantize_int8

DEVICE = os.environ.get("ZMZOO_TEST_DEVICE", "cpu")
NAMES = list(formats())


def same_quantization(got, want, silu):
    """``quantize_act`` and ``quantize_act_ref`` agree: x^ equal (with the SiLU a rounding may flip by one step
    where the two exps differ in the last bit: at most 1 % of them), dx to fp32 rounding, the block sums those of
    x^ exactly and of x' to fp32 summation order."""
    diff = (got.xq.int() - want.xq.int()).abs()
    if silu:
        assert diff.max().item() <= 1 and diff.float().mean().item() <= 0.01, diff.sum().item()
    else:
        assert diff.max().item() == 0, diff.nonzero()[:5]
    torch.testing.assert_close(got.dx, want.dx, rtol=1e-6, atol=0)
    m, k = got.xq.shape
    assert torch.equal(got.xsum_q, got.xq.int().reshape(m, -1, ACT_BLOCK).sum(-1))
    torch.testing.assert_close(got.xsum, want.xsum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sq, want.sq, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fusion", ["plain", "norm", "silu"])
@pytest.mark.parametrize("m,k", [(1, 32), (3, 352), (2, 1024)])
def test_act_quant_kernel_matches_reference(m, k, fusion, dtype):
    """K = 352: 11 blocks (the last program's 8 blocks partly past the row); a block of zeros gets step 0, no NaN."""
    x, kw = fused_inputs(m, 8, k, dtype, norm=fusion == "norm", silu=fusion == "silu", residual=False, seed=k)
    x[0, :ACT_BLOCK] = 0
    got = quantize_act(x, kw["norm"], fusion == "silu")
    want = quantize_act_ref(x, kw["norm"], fusion == "silu")
    same_quantization(got, want, fusion == "silu")
    assert got.dx[0, 0].item() == 0 and not got.xq[0, :ACT_BLOCK].any()
    amax = want.xq.int().abs().reshape(m, -1, ACT_BLOCK).amax(-1)
    assert (amax[want.dx > 0] == 127).all()  # every nonzero block reaches the full range


def test_act_quant_reference_rounds_to_nearest():
    """x^ = round(x / dx) with dx = max|x| / 127: every |x - dx x^| is at most dx / 2."""
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(3)) * 5
    a = quantize_act_ref(x)
    back = (a.xq.float().reshape(4, -1, ACT_BLOCK) * a.dx[..., None]).reshape(4, 256)
    half = (a.dx / 2).repeat_interleave(ACT_BLOCK, dim=1)
    assert ((x - back).abs() <= half * (1 + 1e-6)).all()


def same_as_unfused(fused, unfused):
    """The fused kernel's result against the unfused kernel's at the same setting. In the interpreter they are equal
    bit for bit: the same x^ (the same operations in the same order on the same x'), the same block sums (numpy sums
    the same axes of the same shapes) and the same loop after them. Compiled (ZMZOO_TEST_DEVICE=cuda), x^ is still
    the same but the blocks' fp32 sums X and x'^2 are reduced across threads in another order: fp32 to 1e-5 of max
    |y| (X z' and the norm's rsqrt move by a few fp32 roundings), and bf16 or fp16 to one rounding of the output."""
    assert fused.dtype == unfused.dtype and fused.shape == unfused.shape
    if DEVICE == "cpu":
        assert torch.equal(fused, unfused), (fused - unfused).abs().max().item()
        return
    tol = 1e-5 if fused.dtype == torch.float32 else 2**-7
    torch.testing.assert_close(fused, unfused, rtol=tol, atol=tol * unfused.abs().max().item())


def fused(cfg):
    """The fused twin of a launch setting."""
    return cfg._replace(fuse=1)


def product_case(name, m, n, k, fusion, dtype, seed=0):
    qt = weights(n, k, seed=seed)[name]
    x, kw = fused_inputs(m, n, k, dtype, bias=fusion["norm"], seed=seed + m, **fusion)
    return qt, x, kw.pop("b"), kw


def same_activations_product(x, qt, b, kw, silu):
    """What the kernel must equal: its own quantized activations through the plain-torch product, in fp32."""
    a = quantize_act(x.reshape(-1, x.shape[-1]), kw["norm"], silu)
    return qgemv_a8_from(a, qt, b, eps=1e-5, norm=kw["norm"] is not None, residual=kw["residual"])


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("fusion", FUSIONS, ids=FIDS)
@pytest.mark.parametrize("name", NAMES)
def test_qgemv_a8_fp32_matches_reference(name, fusion, m):
    """K = 192 (6 blocks, not a multiple of BLOCK_K), N = 37, a bias where the norm is; the default setting and its
    fused twin."""
    qt, x, b, kw = product_case(name, m, 37, 192, fusion, torch.float32, seed=m)
    got = qgemv_a8(x, qt, b, backend="triton", eps=1e-5, silu=fusion["silu"], **kw)
    one = qgemv_a8(x, qt, b, backend="triton", eps=1e-5, silu=fusion["silu"], config=fused(a8_config(m, qt.bits)),
                   **kw)
    same_as_unfused(one, got)
    want = same_activations_product(x, qt, b, kw, fusion["silu"])
    ref = None if fusion["silu"] else qgemv_a8_ref(x, qt, b, eps=1e-5, silu=False, **kw)
    for y in (got, one):
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
        if ref is not None:  # the reference quantizes the same integers (no exp involved)
            torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fusion", FUSIONS, ids=FIDS)
@pytest.mark.parametrize("name", NAMES)
def test_qgemv_a8_within_error_bound(name, fusion, dtype):
    """Against the exact product (fp64, exact activations, the exactly dequantized weight): the kernel and the
    reference are within ``a8_error_bound`` plus the output's rounding (fp32: 1e-5 of max |y|; bf16: half an ulp of
    each output, 2^-8 |y|, plus the bf16 inputs' fusions computed in fp32). The bound is not vacuous: under 25 % of
    max |y| at K = 320 with activations of mean 0.5, std 3. In bf16 the fused kernel too, which equals the unfused
    one (in fp32, ``test_qgemv_a8_fp32_matches_reference`` holds them equal)."""
    qt, x, b, kw = product_case(name, 3, 48, 320, fusion, dtype, seed=5)
    want = exact(x, qt, b, kw["norm"], fusion["silu"], kw["residual"], 1e-6)
    bound = a8_error_bound(x, qt, norm=kw["norm"], silu=fusion["silu"]).double()
    scale = want.abs().max().item()
    assert bound.max().item() < 0.25 * scale
    out_round = 1e-5 * scale if dtype == torch.float32 else 2**-8 * want.abs() + 1e-3 * scale
    outs = [qgemv_a8(x, qt, b, backend="triton", silu=fusion["silu"], **kw),
            qgemv_a8(x, qt, b, backend="torch", silu=fusion["silu"], **kw)]
    if dtype == torch.bfloat16:
        outs.append(qgemv_a8(x, qt, b, backend="triton", silu=fusion["silu"], config=fused(a8_config(3, qt.bits)),
                             **kw))
        same_as_unfused(outs[-1], outs[0])
    for got in outs:
        assert got.dtype == dtype
        excess = (got.double() - want).abs() - bound - out_round
        assert excess.max().item() <= 0, excess.max().item()


def cid(c):
    return "n{}k{}w{}s{}x{}".format(*c) + ("-fused" if c.fuse else "")


CANDIDATES = sorted(set(A8_INT4_CANDIDATES) | set(A8_INT8_CANDIDATES))


@pytest.mark.parametrize("cfg", [c for c in CANDIDATES if not c.fuse], ids=cid)
@pytest.mark.parametrize("m", [1, 3])
def test_qgemv_a8_every_tuning_candidate(cfg, m):
    """Every setting tune() may pick (at this row count), int8 per channel and int4 per 64, norm and residual: each
    unfused one and its fused twin (the lists hold both, ``test_qgemv_a8_default_settings``)."""
    ws = weights(37, 320, seed=7)
    x, kw = fused_inputs(m, 37, 320, torch.float32, norm=True, silu=False, residual=True, seed=m)
    cfg = a8_kernel_config(for_rows(cfg, m))
    for name in ("int8-row", "int4-g64"):
        got = qgemv_a8(x, ws[name], backend="triton", config=cfg, eps=1e-5, **kw)
        torch.testing.assert_close(got, same_activations_product(x, ws[name], None, kw, False), rtol=1e-5,
                                   atol=1e-5)
        same_as_unfused(qgemv_a8(x, ws[name], backend="triton", config=fused(cfg), eps=1e-5, **kw), got)


ODD = [(c, n, k) for c in (Config(16, 64, 4, 1), Config(16, 64, 4, 1, 3), Config(32, 128, 4, 1, 2))
       for n, k in ((3, 64), (130, 448), (37, 1024))] + [(Config(8, 32, 1, 1), 3, 64)]  # the last: slow interpreted


@pytest.mark.parametrize("cfg,n,k", ODD, ids=lambda v: cid(v) if isinstance(v, Config) else str(v))
@pytest.mark.parametrize("name", ["int8-row", "int8-g32", "int4-sym-g32", "int4-g32"])
def test_qgemv_a8_odd_sizes_and_splits(name, cfg, n, k):
    """N of 3 and past BLOCK_N, K of two blocks and of 14 (not a multiple of BLOCK_K = 128), split across 2 and 3
    programs (``_qgemv_reduce`` finishes), with the SiLU gate and the residual (the down projection's fusion), 2
    rows. The fused twin too where the interpreter is quick: at N = 3, and at N = 130, K = 448 with BLOCK_N = 32
    (split in 2, the second range 192 columns: blocks past its end; N past BLOCK_N)."""
    fusion = dict(norm=False, silu=True, residual=True)
    qt, x, b, kw = product_case(name, 2, n, k, fusion, torch.float32, seed=n + k)
    got = qgemv_a8(x, qt, b, backend="triton", config=cfg, eps=1e-5, silu=True, **kw)
    torch.testing.assert_close(got, same_activations_product(x, qt, b, kw, True), rtol=1e-5, atol=1e-5)
    if n == 3 or (k == 448 and cfg.block_n == 32):
        same_as_unfused(qgemv_a8(x, qt, b, backend="triton", config=fused(cfg), eps=1e-5, silu=True, **kw), got)


FULL = [(1, Config(32, 128, 4, 1), FUSIONS[4]), (2, Config(16, 64, 4, 1, 2), FUSIONS[2])]


@pytest.mark.parametrize("m,cfg,fusion", FULL, ids=["1row-norm-residual", "2rows-split-silu-residual"])
@pytest.mark.parametrize("name", NAMES)
def test_qgemv_a8_full_tiles(name, m, cfg, fusion):
    """N a multiple of BLOCK_N, K of BLOCK_K, the rows a power of two: nothing out of range, the loads unmasked
    (NOMASK); 1 row with the norm, a bias and the residual, 2 rows split in 2 with the SiLU gate and the residual;
    the fused kernel with the unfused."""
    cfg = for_rows(cfg, m)
    qt, x, b, kw = product_case(name, m, 32, 128, fusion, torch.float32, seed=m + 3)
    assert 32 % cfg.block_n == 0 and 128 % cfg.block_k == 0
    got = qgemv_a8(x, qt, b, backend="triton", config=cfg, eps=1e-5, silu=fusion["silu"], **kw)
    torch.testing.assert_close(got, same_activations_product(x, qt, b, kw, fusion["silu"]), rtol=1e-5, atol=1e-5)
    same_as_unfused(qgemv_a8(x, qt, b, backend="triton", config=fused(cfg), eps=1e-5, silu=fusion["silu"], **kw), got)


def test_qgemv_a8_fused_is_one_kernel(monkeypatch):
    """fuse = 1 runs no quantization kernel (through ``torch.ops.zmzoo.qgemv_a8``, whose last argument it is)."""
    qt = weights(40, 256, seed=4)["int4-g64"]
    x, kw = fused_inputs(2, 40, 256, torch.float32, norm=True, silu=False, residual=True, seed=4)
    want = qgemv_a8(x, qt, backend="triton", config=Config(16, 64, 4, 1), eps=1e-5, **kw)

    def refused(*a, **k):
        raise AssertionError("the fused product launched the quantization kernel")

    monkeypatch.setattr(A8, "quantize_act", refused)
    got = qgemv_a8(x, qt, backend="triton", config=Config(16, 64, 4, 1, 1, 1), eps=1e-5, **kw)
    same_as_unfused(got, want)
    with pytest.raises(AssertionError, match="launched the quantization kernel"):
        qgemv_a8(x, qt, backend="triton", config=Config(16, 64, 4, 1), eps=1e-5, **kw)
    assert str(torch.ops.zmzoo.qgemv_a8.default._schema).endswith("split=1, SymInt fuse=0) -> Tensor")


def test_qgemv_a8_norm_split():
    """The norm's statistics summed over the split's programs (``_qgemv_reduce``), leading dims kept."""
    qt = weights(40, 512, seed=2)["int4-g64"]
    x, kw = fused_inputs(3, 40, 512, torch.float32, norm=True, silu=False, residual=False, seed=2)
    got = qgemv_a8(x.reshape(3, 1, 512), qt, backend="triton", config=Config(16, 64, 4, 1, 4), eps=1e-5,
                   norm=kw["norm"])
    assert got.shape == (3, 1, 40)
    torch.testing.assert_close(got.reshape(3, 40), same_activations_product(x, qt, None, kw, False), rtol=1e-5,
                               atol=1e-5)
    one = qgemv_a8(x.reshape(3, 1, 512), qt, backend="triton", config=Config(16, 64, 4, 1, 4, 1), eps=1e-5,
                   norm=kw["norm"])  # the fused kernel: each range's squares, from its own x
    same_as_unfused(one, got)


def test_qgemv_a8_default_settings():
    """The untuned settings are unfused; tune() tries every candidate both ways (the fused ones are exactly the
    unfused ones' twins)."""
    assert a8_config(1, 4) == Config(64, 512, 4, 1) and a8_config(1, 8) == Config(64, 256, 4, 1)
    assert a8_config(1, 4).fuse == 0 and Config(1, 1, 1, 1).fuse == 0
    assert a8_kernel_config(Config(16, 16, 4, 1)).block_k == 32
    assert a8_kernel_config(Config(16, 16, 4, 1, 2, 1)) == Config(16, 32, 4, 1, 2, 1)
    for cands in (A8_INT4_CANDIDATES, A8_INT8_CANDIDATES):
        plain = [c for c in cands if not c.fuse]
        assert len(set(cands)) == len(cands) == 2 * len(plain)
        assert {fused(c) for c in plain} == {c for c in cands if c.fuse}
        for cfg in cands:
            assert cfg.block_k % ACT_BLOCK == 0


def test_qgemv_a8_bad_inputs_are_named():
    qt = quantize_int8(torch.randn(8, 48))
    with pytest.raises(ValueError, match="K = 48 is not a multiple of 32"):
        qgemv_a8(torch.randn(1, 48), qt, backend="torch")
    with pytest.raises(ValueError, match="backend 'cuda'"):
        qgemv_a8(torch.randn(1, 48), qt, backend="cuda")
    with pytest.raises(ValueError, match="act_quant='int4' is not one of"):
        check_act_quant("int4")
    check_act_quant(None)
    check_act_quant("int8")

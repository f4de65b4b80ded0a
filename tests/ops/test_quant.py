"""zmzoo's quantized layout (zmzoo/ops/quant.py): quantize -> dequantize error bounds, GGUF Q8_0 / Q4_0 / Q4_1 blocks
repacked bit for bit, the dequantize kernel against its reference (Triton's interpreter on CPU)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from zmzoo.ops.quant import (
    INT4_GROUPS,
    QTensor,
    check_group,
    check_qtensor,
    dequantize,
    dequantize_ref,
    dequantize_rows_ref,
    from_gguf_blocks,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

DEVICE = os.environ.get("ZMZOO_TEST_DEVICE", "cpu")


def weight(n, k, seed=0, dtype=torch.float32):
    """Rows of very different magnitudes, an all-zero row and a constant group, as real checkpoints have."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.logspace(-4, 1, n)[:, None]
    w[1] = 0
    w[2, :32] = 0.37
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(7, 1), (37, 257), (5, 1000)])
def test_int8_round_trip_within_half_a_step(n, k, dtype):
    """int8 per output channel: q in -127..127, one fp32 scale a row, |w - scale * q| <= scale / 2 (+ the fp32
    rounding of scale * q: |w| 2**-23)."""
    w = weight(n, k, dtype=dtype) if n > 2 else torch.randn(n, k).to(dtype)
    qt = quantize_int8(w, rows=3)  # several row chunks
    check_qtensor(qt)
    assert qt.q.dtype == torch.int8 and qt.scale.shape == (n, 1) and qt.scale.dtype == torch.float32
    assert int(qt.q.abs().max()) <= 127
    err = (dequantize_ref(qt) - w.float()).abs()
    assert bool((err <= qt.scale * 0.5 + w.float().abs() * 2**-23).all())
    assert bool((qt.scale.float() * 127 >= w.float().abs().amax(1, keepdim=True) * (1 - 1e-6)).all())


@pytest.mark.parametrize("group", INT4_GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_round_trip_within_half_a_step(group, dtype):
    """int4 asymmetric per group: fp16 scale and zero; zero <= the group's minimum, zero + 15 scale >= its maximum,
    every |w - (scale * q + zero)| <= scale / 2 (fp32 rounding aside: 1e-6 of the group's magnitude)."""
    n, k = 19, 384
    w = weight(n, k, seed=group, dtype=dtype)
    qt = quantize_int4(w, group, rows=4)
    check_qtensor(qt)
    assert qt.q.shape == (n, k // 2) and qt.scale.shape == (n, k // group) and qt.scale.dtype == torch.float16
    wg = w.float().reshape(n, k // group, group)
    s, z = qt.scale.float()[..., None], qt.zero.float()[..., None]
    assert bool((z <= wg.amin(-1, keepdim=True)).all())
    assert bool((z + 15 * s >= wg.amax(-1, keepdim=True)).all())
    err = (dequantize_ref(qt).reshape(n, k // group, group) - wg).abs()
    assert bool((err <= 0.5 * s + 1e-6 * wg.abs().amax(-1, keepdim=True)).all())
    assert torch.equal(dequantize_ref(qt)[1], torch.zeros(k))  # an all-zero row comes back as zeros


def test_int4_pack_is_llamacpp_nibble_order():
    """Byte 16 c + j of a row: column 32 c + j in the low nibble, 32 c + 16 + j in the high one."""
    q = torch.randint(0, 16, (3, 96), generator=torch.Generator().manual_seed(1))
    p = pack_int4(q)
    assert p.shape == (3, 48)
    assert torch.equal(p[:, 16 + 5] & 15, q[:, 32 + 5].to(torch.uint8))
    assert torch.equal(p[:, 16 + 5] >> 4, q[:, 48 + 5].to(torch.uint8))
    assert torch.equal(unpack_int4(p), q.to(torch.uint8))


def test_bad_groups_and_layouts_are_named():
    with pytest.raises(ValueError, match=r"group_size=48 must be one of \(32, 64, 128\)"):
        check_group(48, 96)
    with pytest.raises(ValueError, match="group_size=64 does not divide .* = 96 .*group_size=32"):
        quantize_int4(torch.randn(4, 96), 64)
    with pytest.raises(ValueError, match="fp16's range"):
        quantize_int4(torch.full((2, 32), 1e6), 32)
    with pytest.raises(ValueError, match="zmzoo's layout"):
        check_qtensor(QTensor(torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 2), None, 32, 4))  # K = 32: 1 group
    with pytest.raises(ValueError, match="2-D floating-point"):
        quantize_int8(torch.ones(3, dtype=torch.int32))


GGUF_TYPES = ["Q8_0", "Q4_0", "Q4_1"]


@pytest.mark.parametrize("kind", GGUF_TYPES)
def test_gguf_blocks_repack_exactly(kind):
    """A tensor quantized by gguf itself, repacked from its raw bytes (integer copies only), dequantizes to gguf's own
    ``dequantize`` bit for bit (odd row count, several blocks a row, rows of very different magnitudes)."""
    gguf = pytest.importorskip("gguf")
    qtype = gguf.GGMLQuantizationType[kind]
    w = weight(11, 160, seed=3).numpy()
    raw = gguf.quants.quantize(w, qtype)  # (11, 5 blocks * bytes) uint8
    want = gguf.quants.dequantize(raw, qtype)
    qt = from_gguf_blocks(torch.from_numpy(raw.copy()), kind, 160)
    check_qtensor(qt)
    assert qt.scale.dtype == torch.float16 and qt.group == 32 and (qt.zero is not None) == (kind == "Q4_1")
    assert torch.equal(dequantize_ref(qt), torch.from_numpy(np.ascontiguousarray(want)))
    assert qt.nbytes() == raw.nbytes  # nothing added, nothing lost


def test_dequantize_rows_is_a_lookup():
    qt = quantize_int4(weight(9, 64), 32)
    idx = torch.tensor([[3, 0], [8, 3]])
    assert torch.equal(dequantize_rows_ref(qt, idx, torch.float32), dequantize_ref(qt)[idx])


def formats(n=37, k=192, seed=0, gain=1.0):
    """One weight (``weight`` times ``gain``) in every layout the kernels read: int8 per channel, int8 per 32 (Q8_0),
    int4 symmetric per 32 (Q4_0), int4 asymmetric per 32 / 64 (Q4_1, zmzoo's int4)."""
    w = weight(n, k, seed) * gain
    q8_0 = torch.round(w.reshape(n, -1, 32) / (s := (w.reshape(n, -1, 32).abs().amax(-1) / 127).clamp(min=1e-8)
                                                .half().float())[..., None]).clamp(-127, 127)
    q4_0 = torch.round(w.reshape(n, -1, 32) / (d := (w.reshape(n, -1, 32).abs().amax(-1) / 8).clamp(min=1e-8)
                                                .half().float())[..., None]).clamp(-8, 7) + 8
    return {
        "int8-row": quantize_int8(w),
        "int8-g32": QTensor(q8_0.reshape(n, k).to(torch.int8), s.half(), None, 32, 8),
        "int4-sym-g32": QTensor(pack_int4(q4_0.reshape(n, k)), d.half(), None, 32, 4),
        "int4-g32": quantize_int4(w, 32),
        "int4-g64": quantize_int4(w, 64),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(formats()))
def test_dequantize_kernel_matches_reference(name, dtype):
    pytest.importorskip("triton")
    qt = formats(n=45)[name].map(lambda t: t.to(DEVICE))
    got = dequantize(qt, dtype, backend="triton")
    want = dequantize_ref(qt, dtype)
    if DEVICE == "cpu":  # the interpreter computes q * scale + zero as the reference does, in two roundings
        assert torch.equal(got, want)
    else:  # a GPU may contract them into one FMA: the last fp32 bit, before the rounding to dtype
        torch.testing.assert_close(got, want, rtol=2**-7 if dtype == torch.bfloat16 else 2**-10, atol=0)

"""Triton decode attention against ``decode_attention_ref`` (Triton's interpreter on CPU, see conftest.py).

Whole tensors are compared: ``out``, ``new_score`` and the in-place ``scores``. In fp32 the kernel must match the
reference to rounding; in bf16/fp16 its error against the fp32 reference of the same inputs must be at most twice the
error of the reference run on the low-precision inputs (flash-attn's criterion).
"""

from __future__ import annotations

import pytest
import torch

from zmzoo.ops.decode_attention import _decode_attention_launch, decode_attention, decode_attention_ref, slot_range

LOW = (torch.bfloat16, torch.float16)


def make_inputs(bsz, n_heads, n_kv, s_len, d, dtype, *, seed=0, w=True, scores=True, new=True, rows=None):
    """Random, non-contiguous inputs: K/V are (B, S, Hkv, D) buffers seen as (B, Hkv, S, D), q, k_new, v_new, w,
    scores and start/end are slices of larger buffers. ``rows``: (start, end) per row."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    q = randn(bsz, n_heads, d + 8)[..., 3 : 3 + d]
    k = randn(bsz, s_len, n_kv, d).transpose(1, 2)
    v = randn(bsz, s_len, n_kv, d).transpose(1, 2)
    if rows is None:
        rows = [(0, s_len), (min(3, s_len - 1), max(1, s_len - 2))][:bsz]
    se = torch.tensor([x for r in rows for x in (r[0], -1, r[1], -1)], dtype=torch.int64)
    start, end = se[0::4], se[2::4]  # stride-4 views
    inp = dict(q=q, k=k, v=v, start=start, end=end, k_new=None, v_new=None, w=None, scores=None)
    if new:
        inp["k_new"] = randn(bsz, 1, n_kv, d)[:, 0]
        inp["v_new"] = randn(bsz, n_kv, 2, d)[:, :, 1]
    if w:
        inp["w"] = (torch.rand(bsz, n_kv, s_len + 3, generator=gen) * 4 + 0.25)[..., 2 : 2 + s_len]
    if scores:
        inp["scores"] = torch.rand(bsz, n_kv, s_len + 1, generator=gen)[..., 1:]
    return inp


def clone(inp, dtype=None):
    out = {}
    for key, t in inp.items():
        if t is None or key in ("start", "end", "w", "scores"):
            out[key] = t.clone() if t is not None else None
        else:
            out[key] = t.to(dtype) if dtype is not None else t.clone()
    return out


def run(fn, inp, **kw):
    out, new_score = fn(**inp, **kw)
    return out, new_score, inp["scores"]


def check(inp, *, backend_kw=None, **kw):
    """Run the kernel and the reference on copies of ``inp`` and compare out, new_score and scores."""
    dtype = inp["q"].dtype
    got = run(lambda **a: decode_attention(**a, backend="triton", **kw) if backend_kw is None
              else _decode_attention_launch(**a, **backend_kw, **kw), clone(inp))
    want = run(lambda **a: decode_attention_ref(**a, **kw), clone(inp))
    assert got[0].dtype == dtype and got[0].shape == inp["q"].shape
    if dtype in LOW:
        exact = run(lambda **a: decode_attention_ref(**a, **kw), clone(inp, torch.float32))
        err_ref = (want[0].float() - exact[0]).abs().max().item()
        err = (got[0].float() - exact[0]).abs().max().item()
        assert err <= 2 * err_ref + 1e-6, f"kernel error {err} > 2 x reference error {err_ref}"
    else:
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    for g, r in zip(got[1:], want[1:]):
        if r is None:
            assert g is None or g.numel() == 0
        else:
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


# (slots, head_dim, group, kv heads): odd slot counts, both head dims, GQA groups 1, 3, 4, 8
SHAPES = [(1, 64, 1, 2), (7, 128, 3, 1), (129, 64, 4, 2), (2049, 128, 8, 1), (2049, 64, 1, 2), (129, 128, 1, 1),
          (7, 64, 8, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("s_len,d,group,n_kv", SHAPES)
def test_compressed_cache_call(s_len, d, group, n_kv, dtype):
    """The ZeroMerge call: w, scores and the new token, two rows with different valid ranges."""
    inp = make_inputs(2, group * n_kv, n_kv, s_len, d, dtype, seed=s_len + d + group)
    check(inp, logw_scale=0.6, decay=0.98)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("w,scores,new", [(False, True, True), (True, False, True), (True, True, False),
                                          (False, False, True), (False, False, False)])
def test_optional_inputs(w, scores, new, dtype):
    """w=None (no compensation), scores=None, k_new=None; all three None is the full cache's call."""
    inp = make_inputs(3, 8, 2, 300, 64, dtype, w=w, scores=scores, new=new, seed=7,
                      rows=[(0, 300), (40, 257), (5, 6)])
    check(inp, decay=0.9, sm_scale=0.2)


def test_empty_rows_attend_to_the_new_token_only():
    """A row with no valid slot (start == end) gives the new token all the mass; its scores stay untouched."""
    inp = make_inputs(3, 4, 2, 65, 64, torch.float32, rows=[(0, 0), (10, 10), (0, 65)], seed=3)
    check(inp, decay=0.5)
    out, new_score = decode_attention(**clone(inp), backend="triton")
    torch.testing.assert_close(out[:2], inp["v_new"][:2].repeat_interleave(2, dim=1), rtol=0, atol=1e-6)
    torch.testing.assert_close(new_score[:2], torch.full((2, 2), 2.0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("end_offset,window", [(0, None), (1, None), (1, 50), (0, 7)])
def test_range_from_the_position(end_offset, window):
    """start=None: the caches hand over their position tensor and the kernel derives [end + end_offset - window,
    end + end_offset) clamped to the slots: the same as the explicit (start, end) call, in both backends."""
    inp = make_inputs(3, 8, 2, 120, 64, torch.float32, seed=9)
    inp["start"], inp["end"] = None, torch.tensor([119, 200, 30])  # at the last slot, past the slot count, inside
    kw = dict(end_offset=end_offset, window=window, logw_scale=0.6, decay=0.9)
    check(inp, **kw)
    explicit = clone(inp)
    explicit["start"], explicit["end"] = slot_range(None, inp["end"], end_offset, window)
    a = clone(inp)
    got = decode_attention(**a, backend="triton", **kw)
    want = decode_attention_ref(**explicit, logw_scale=0.6, decay=0.9)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a["scores"], explicit["scores"], rtol=1e-5, atol=1e-6)


def test_range_past_the_cache_end_is_clamped():
    inp = make_inputs(2, 6, 3, 70, 64, torch.float32, rows=[(0, 1000), (69, 500)], seed=4)
    check(inp, decay=0.98)


@pytest.mark.parametrize("block_n,n_splits", [(16, 64), (32, 1), (16, 7)])
def test_split_counts(block_n, n_splits):
    """More splits than valid tiles (empty splits), a single split, and an odd count."""
    inp = make_inputs(2, 8, 2, 200, 64, torch.bfloat16, seed=5, rows=[(0, 37), (11, 200)])
    check(inp, backend_kw=dict(block_n=block_n, n_splits=n_splits), logw_scale=1.0, decay=0.98, sm_scale=0.125)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("s_len,d,group,n_kv,window", [(7, 64, 1, 2, None), (129, 128, 3, 1, 50),
                                                        (2049, 64, 4, 2, None), (300, 128, 8, 1, 9)])
def test_store_new_is_the_full_cache_append(s_len, d, group, n_kv, window, dtype):
    """store_new (the full cache's Triton path): attend [end - window, end) plus the new token, then k_new/v_new land
    in slot end[b]; equal to writing first and attending [end + 1 - (window + 1), end + 1), and only slot end[b] of
    K and V changes. Rows: the middle, the last slot, past the end (writes nothing), slot 0 (new token only)."""
    inp = make_inputs(4, group * n_kv, n_kv, s_len, d, dtype, w=False, scores=False, seed=s_len + group)
    inp["start"], inp["end"] = None, torch.tensor([s_len // 2, s_len - 1, s_len + 5, 0])
    kw = dict(window=window, sm_scale=0.3)
    check(inp, store_new=True, **kw)  # out against the reference's, K/V below
    got, ref = clone(inp), clone(inp)
    decode_attention(**got, backend="triton", store_new=True, **kw)
    decode_attention_ref(**ref, store_new=True, **kw)
    for name in ("k", "v"):
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=0)
        changed = (got[name] != inp[name]).any(-1)  # (B, Hkv, S)
        for b, e in enumerate(inp["end"].tolist()):
            want = torch.zeros(s_len, dtype=torch.bool)
            if e < s_len:
                want[e] = True
            assert torch.equal(changed[b].any(0), want), (name, b)
            if e < s_len:
                src = inp["k_new"] if name == "k" else inp["v_new"]
                torch.testing.assert_close(got[name][b, :, e], src[b], rtol=0, atol=0)
    # the same as the append-then-attend call the torch path makes
    if dtype == torch.float32:
        first = clone(inp)
        rows = torch.arange(4)
        inside = inp["end"] < s_len
        e = inp["end"][inside]
        first["k"][rows[inside], :, e] = inp["k_new"][inside]
        first["v"][rows[inside], :, e] = inp["v_new"][inside]
        first["k_new"] = first["v_new"] = None
        want, _ = decode_attention_ref(**first, end_offset=1, window=window + 1 if window else None, sm_scale=0.3)
        out, _ = decode_attention(**clone(inp), backend="triton", store_new=True, **kw)
        torch.testing.assert_close(out[inside], want[inside], rtol=1e-5, atol=1e-5)


def test_store_new_refuses_an_attended_slot():
    inp = make_inputs(1, 2, 2, 9, 64, torch.float32, w=False, scores=False)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match="end_offset 0"):
            decode_attention(**clone(inp), end_offset=1, store_new=True, backend=backend)
        with pytest.raises(ValueError, match="needs k_new and v_new"):
            decode_attention(**dict(clone(inp), k_new=None, v_new=None), store_new=True, backend=backend)


def test_op_is_registered_with_its_mutation():
    schema = torch.ops.zmzoo.decode_attention.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["scores"], str(schema)
    schema = torch.ops.zmzoo.decode_attention_store.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert sorted(mutated) == ["k", "scores", "v"], str(schema)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces through the op. Under the interpreter only backend='eager' can run it
    (AOTAutograd would have to trace the interpreter); inductor and CUDA graphs are exercised by bench/ops.py."""
    inp = make_inputs(2, 4, 2, 33, 64, torch.float32, seed=6)

    def step(q, k, v, start, end, k_new, v_new, w, scores):
        out, new_score = decode_attention(q, k, v, start, end, k_new, v_new, w, scores, logw_scale=0.6, decay=0.98,
                                          backend="triton")
        return out * 2, new_score + 1

    a, b = clone(inp), clone(inp)
    want = step(**a)
    got = torch.compile(step, fullgraph=True, backend="eager")(**b)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(b["scores"], a["scores"], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_slots_outside_the_range_are_never_read(backend):
    """Non-finite garbage outside [start, end) (an uninitialised buffer) changes nothing, in either backend."""
    inp = make_inputs(2, 4, 2, 40, 64, torch.float32, seed=6, rows=[(0, 17), (3, 29)])
    dirty = clone(inp)
    for b, (lo, hi) in enumerate([(0, 17), (3, 29)]):
        for name in ("k", "v"):
            dirty[name][b, :, :lo] = float("nan")
            dirty[name][b, :, hi:] = float("inf")
        dirty["w"][b, :, hi:] = float("nan")
    clean = clone(inp)
    want_out, want_new = decode_attention(**clean, backend=backend)
    got_out, got_new = decode_attention(**dirty, backend=backend)
    torch.testing.assert_close(got_out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(got_new, want_new, rtol=0, atol=0)
    torch.testing.assert_close(dirty["scores"], clean["scores"], rtol=0, atol=0)

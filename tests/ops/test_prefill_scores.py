"""Triton prefill scores against ``prefill_scores_ref`` (Triton's interpreter on CPU, see conftest.py).

q is passed the way ZeroMergeCache passes it: the last W queries sliced out of a (1, H, T, D) tensor. Both sides
compute in fp32 from the same input values, so low-precision inputs are compared at fp32 tolerances too.
"""

from __future__ import annotations

import pytest
import torch

from zmzoo.ops.prefill_scores import decay_window, prefill_scores, prefill_scores_ref


def make_inputs(n_heads, n_kv, t, d, dtype, *, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, t, n_heads, d, generator=gen).to(dtype).transpose(1, 2)  # (1, H, T, D), non-contiguous
    k = torch.randn(n_kv, t, d + 8, generator=gen).to(dtype)[..., 4 : 4 + d]
    return q, k


def check(q_full, k, n_q, decay, **kw):
    t = k.shape[1]
    q = q_full[0, :, t - n_q :]
    got = prefill_scores(q, k, decay=decay, backend="triton", **kw)
    want = prefill_scores_ref(q, k, decay=decay, **kw)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)


# (heads, kv heads, prompt length T, head dim)
SHAPES = [(4, 4, 1, 64), (6, 2, 7, 128), (8, 2, 129, 64), (3, 1, 300, 128), (8, 1, 129, 128)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n_heads,n_kv,t,d", SHAPES)
def test_decayed_scores(n_heads, n_kv, t, d, dtype):
    """ZeroMerge's scoring: the last decay_window(0.98) queries (all of them up to ~1000 tokens)."""
    q, k = make_inputs(n_heads, n_kv, t, d, dtype, seed=t + d)
    check(q, k, decay_window(0.98, t), 0.98)


def test_long_prompt():
    """T = 2049 (odd, past two key tiles of 1024) with the full 0.98 window of 1027 queries."""
    q, k = make_inputs(2, 1, 2049, 64, torch.bfloat16, seed=2)
    check(q, k, decay_window(0.98, 2049), 0.98)


@pytest.mark.parametrize("n_q", [1, 8, 65])
def test_windowed_scores(n_q):
    """The SnapKV-style variant: the last few queries, undecayed (decay = 1), a window shorter than the prompt."""
    q, k = make_inputs(8, 2, 257, 64, torch.bfloat16, seed=n_q)
    check(q, k, n_q, 1.0, sm_scale=0.1)


def test_strong_decay_and_short_window():
    """decay 0.5 over a window cut shorter than decay_window: weights span 2^-40 .. 1."""
    q, k = make_inputs(4, 2, 150, 64, torch.float32, seed=9)
    check(q, k, 41, 0.5)


def test_compile_fullgraph():
    q, k = make_inputs(4, 2, 40, 64, torch.float32, seed=1)

    def score(q, k):
        return prefill_scores(q[0, :, 10:], k, decay=0.98, backend="triton") * 2

    want = score(q, k)
    got = torch.compile(score, fullgraph=True, backend="eager")(q, k)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_heads,n_kv,t,d", [(6, 2, 129, 64), (4, 4, 300, 128)])
def test_given_lse_equals_recomputed(n_heads, n_kv, t, d, dtype):
    """With the queries' log-sum-exp from the prompt's attention (the CPU flash kernel here, as ZeroMergeCache passes
    it), both the reference and the kernel's one-pass path give the two-pass scores."""
    from zmzoo.ops.prompt_attention import prompt_attention

    q, k_flat = make_inputs(n_heads, n_kv, t, d, torch.float32, seed=t)
    k = k_flat.unsqueeze(0)
    out, lse = prompt_attention(q, k, torch.randn_like(k), sm_scale=d**-0.5, want_lse=True)
    assert lse is not None and lse.shape == (1, n_heads, t)
    n_q = decay_window(0.98, t)
    qw = q[0, :, t - n_q :].to(dtype)
    kd = k_flat.to(dtype)
    want = prefill_scores_ref(qw, kd, decay=0.98)
    lse_w = lse[0, :, t - n_q :]
    tol = dict(rtol=2e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(prefill_scores_ref(qw, kd, decay=0.98, lse=lse_w), want, **tol)
    torch.testing.assert_close(prefill_scores(qw, kd, decay=0.98, lse=lse_w, backend="triton"), want, **tol)
    with pytest.raises(ValueError, match="lse"):
        prefill_scores(qw, kd, decay=0.98, lse=lse_w[:, 1:], backend="triton")


def test_zeromerge_prefill_hands_the_attention_lse_to_the_scoring(monkeypatch):
    """ZeroMergeCache scores the prompt in one pass whichever ops it runs: the prompt's attention returns the
    log-sum-exp (the CPU flash kernel here) and prefill_scores receives it; the torch and Triton scorings agree."""
    import zmzoo.cache.zeromerge as zm
    from zmzoo.cache import build_caches, resolve_cache_config

    seen = []

    def spy(q, k, **kw):
        seen.append(kw.get("lse"))
        return prefill_scores(q, k, **kw)

    monkeypatch.setattr(zm, "prefill_scores", spy)
    cfg = resolve_cache_config(max_seq_len=64, method="zeromerge", kv_budget=12)
    caches = {b: build_caches(cfg, n_layers=1, batch_size=1, n_heads=4, n_kv_heads=2, head_dim=16, max_seq_len=64,
                              dtype=torch.float32, device="cpu", backend=b)[0] for b in ("torch", "triton")}
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16)
    outs = {b: c.prefill(q, k, v, 0) for b, c in caches.items()}
    assert len(seen) == 2 and all(lse is not None and lse.shape == (4, 40) for lse in seen)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(caches["triton"].s, caches["torch"].s, rtol=1e-5, atol=1e-6)
    assert torch.equal(caches["triton"].w, caches["torch"].w)

"""The vectorised caches agree with the slow plain-Python oracle of ZEROMERGE.md, step by step, slot by slot."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmzoo.cache import build_caches, resolve_cache_config

from .oracle import ZeroMergeOracle

D = 8


def compare(cache, oracle, row, n_kv, used, tol=2e-5):
    for h in range(n_kv):
        slots = oracle.slots(h)
        assert len(slots) == used
        for j, sl in enumerate(slots):
            torch.testing.assert_close(cache.k[row, h, j], sl.key, rtol=tol, atol=tol)
            torch.testing.assert_close(cache.v[row, h, j], sl.value, rtol=tol, atol=tol)
            assert abs(float(cache.w[row, h, j]) - sl.w) < 1e-6, (h, j)
            if oracle.policy in ("zeromerge", "h2o"):
                assert abs(float(cache.s[row, h, j]) - sl.s) <= tol * max(1.0, abs(sl.s)), (h, j)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(
    policy=st.sampled_from(["zeromerge", "zeromerge", "h2o", "streaming", "snapkv"]),
    n_kv=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    budget=st.integers(6, 16),
    tail=st.integers(2, 5),
    dense=st.integers(1, 3),
    metric=st.sampled_from(["dot", "l2"]),
    score_merge=st.sampled_from(["max", "sum"]),
    decay=st.sampled_from([0.98, 0.8, 1.0]),
    logw_scale=st.sampled_from([1.0, 0.6]),
    t=st.integers(1, 36),
    steps=st.integers(1, 24),
    seed=st.integers(0, 2**16),
)
def test_cache_matches_oracle(policy, n_kv, group, budget, tail, dense, metric, score_merge, decay, logw_scale, t,
                              steps, seed):
    n_heads = n_kv * group
    sinks = 2
    if policy == "zeromerge":
        if budget <= tail + dense:
            return
        kw = dict(kv_budget=budget, tail=tail, dense=dense, metric=metric, score_merge=score_merge, decay=decay,
                  logw_scale=logw_scale)
        okw = dict(tail=tail, dense=dense, metric=metric, score_merge=score_merge, decay=decay, logw_scale=logw_scale)
    elif policy == "h2o":
        if budget <= tail:
            return
        kw = dict(kv_budget=budget, tail=tail, decay=decay)
        okw = dict(tail=tail, dense=0, decay=decay)
    elif policy == "snapkv":
        if budget <= tail:
            return
        kw = dict(kv_budget=budget, tail=tail, score_window=4, score_pool=3)
        okw = dict(tail=tail, dense=0, score_window=4, score_pool=3)
    else:
        kw = dict(kv_budget=budget, sinks=sinks)
        okw = dict(tail=budget - sinks + 1, dense=0, sinks=sinks)
    cfg = resolve_cache_config(max_seq_len=128, method=policy, **kw)
    cache = build_caches(cfg, n_layers=1, batch_size=1, n_heads=n_heads, n_kv_heads=n_kv, head_dim=D,
                         max_seq_len=128, dtype=torch.float64, device="cpu")[0]
    oracle = ZeroMergeOracle(n_heads, n_kv, D, budget, policy=policy, **okw)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n_heads, t + steps, D, generator=g, dtype=torch.float64)
    k = torch.randn(n_kv, t + steps, D, generator=g, dtype=torch.float64)
    v = torch.randn(n_kv, t + steps, D, generator=g, dtype=torch.float64)
    out_c = cache.prefill(q[None, :, :t], k[None, :, :t], v[None, :, :t], 0)[0]
    out_o = oracle.prefill(q[:, :t], k[:, :t], v[:, :t])
    torch.testing.assert_close(out_c, out_o, rtol=1e-6, atol=1e-6)
    compare(cache, oracle, 0, n_kv, min(t, budget))
    for i in range(steps):
        p = t + i
        pos = torch.tensor([p])
        oc = cache.decode(q[None, :, p, None], k[None, :, p, None], v[None, :, p, None], pos)[0, :, 0]
        oo = oracle.decode(q[:, p], k[:, p], v[:, p])
        torch.testing.assert_close(oc, oo, rtol=2e-5, atol=2e-5)
        compare(cache, oracle, 0, n_kv, min(p + 1, budget))

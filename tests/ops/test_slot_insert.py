"""Triton slot insert against ``slot_insert_ref`` (Triton's interpreter on CPU, see conftest.py).

The kernel must choose the same slots as the reference (first index among ties, like torch.argmin/argmax) and write
the same values; the interpreter computes in IEEE arithmetic like torch on CPU, so whole buffers are compared exactly.
"""

from __future__ import annotations

import pytest
import torch

from zmzoo.cache import build_caches, resolve_cache_config
from zmzoo.ops.slot_insert import slot_insert, slot_insert_ref


def make_state(bsz, n_kv, s_len, d, dtype, *, seed=0, tied_scores=False, dense=1):
    """Non-contiguous k, v (a (B, S, Hkv, D) buffer seen as (B, Hkv, S, D)), w, s slices of larger buffers, and the
    fp32 dense slots, with k, v's dense slots their rounded copies (in bf16 the fp32 slots hold more than k, v: a
    kernel that reads k, v where it must read the fp32 slots shows)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(bsz, s_len, n_kv, d, generator=gen).to(dtype).transpose(1, 2)
    v = torch.randn(bsz, s_len, n_kv, d, generator=gen).to(dtype).transpose(1, 2)
    w = torch.randint(1, 6, (bsz, n_kv, s_len + 2), generator=gen).float()[..., 1:-1]
    w[..., ::3] *= 0.75  # some fractional weights
    s = torch.rand(bsz, n_kv, s_len + 1, generator=gen)[..., :-1]
    if tied_scores:
        s = (s * 4).floor() / 4  # few distinct values: many ties for the argmin
    dense_k = k[:, :, :dense].float() + 1e-3 * torch.randn(bsz, n_kv, dense, d, generator=gen)
    dense_v = v[:, :, :dense].float() + 1e-3 * torch.randn(bsz, n_kv, dense, d, generator=gen)
    k[:, :, :dense] = dense_k.to(dtype)  # the invariant the cache keeps: k, v hold the fp32 slots rounded
    v[:, :, :dense] = dense_v.to(dtype)
    return k, v, w, s, dense_k, dense_v


def make_token(bsz, n_kv, d, dtype, *, seed=0):
    gen = torch.Generator().manual_seed(seed + 1000)
    k_new = torch.randn(bsz, 1, n_kv, d, generator=gen).to(dtype)[:, 0]
    v_new = torch.randn(bsz, n_kv, d + 4, generator=gen).to(dtype)[..., 2 : 2 + d]
    s_new = torch.rand(bsz, n_kv, 2, generator=gen)[..., 0]
    return k_new, v_new, s_new


def check(state, token, pos, base, **kw):
    """state: k, v, w, s, dense_k, dense_v; every buffer compared exactly after one step of both."""
    want = [t.clone() for t in state]
    got = [t.clone() for t in state]
    slot_insert_ref(*want[:4], *token, pos, base, *want[4:], **kw)
    slot_insert(*got[:4], *token, pos, base, *got[4:], backend="triton", **kw)
    for name, g, r in zip(("k", "v", "w", "s", "dense_k", "dense_v"), got, want):
        assert torch.equal(g, r), f"{name} differs: max {(g.float() - r.float()).abs().max().item()}"
    return got


POLICIES = [("merge", "dot", "max"), ("merge", "l2", "sum"), ("merge", "l2", "max"), ("merge", "dot", "sum"),
            ("evict", "dot", "max"), ("ring", "dot", "max")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy,metric,score_merge", POLICIES)
@pytest.mark.parametrize("s_len,d,dense,ring", [(7, 64, 1, 2), (129, 128, 5, 9), (40, 64, 20, 3)])
def test_one_step(s_len, d, dense, ring, policy, metric, score_merge, dtype):
    """Rows appending (pos < S), just full (pos == S), full after a long prompt, and far past the budget."""
    bsz, n_kv = 4, 3
    state = make_state(bsz, n_kv, s_len, d, dtype, seed=s_len + d, tied_scores=dense == 5, dense=dense)
    token = make_token(bsz, n_kv, d, dtype, seed=s_len)
    pos = torch.tensor([s_len // 2, s_len, s_len + 11, 5 * s_len + 3])
    base = torch.tensor([s_len, s_len, s_len + 4, s_len + 1])
    check(state, token, pos, base, dense=dense, ring=ring, policy=policy, metric=metric, score_merge=score_merge)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy,metric,score_merge", POLICIES[:2] + POLICIES[4:])
def test_many_steps(policy, metric, score_merge, dtype):
    """A sequence of decode steps from half full through several ring wrap-arounds, compared after every step."""
    bsz, n_kv, s_len, d, dense, ring = 2, 2, 23, 64, 3, 5
    state = make_state(bsz, n_kv, s_len, d, dtype, seed=1, dense=dense)
    pos = torch.tensor([s_len - 6, s_len + 2])
    base = torch.tensor([s_len, s_len + 2])
    for step in range(25):
        token = make_token(bsz, n_kv, d, dtype, seed=step)
        state = check(state, token, pos, base, dense=dense, ring=ring, policy=policy, metric=metric,
                      score_merge=score_merge)
        pos = pos + 1


def test_ties_across_tiles_and_in_the_dense_metric():
    """Equal lowest scores in two score tiles (S = 2049 > 1024) pick the first; identical dense keys pick the first;
    no new score given (s_new=None) writes 0."""
    bsz, n_kv, s_len, d = 2, 2, 2049, 64
    k, v, w, s, dk, dv = make_state(bsz, n_kv, s_len, d, torch.float32, seed=2, dense=6)
    s[:, :, 1500] = -1.0
    s[:, :, 1900] = -1.0
    s[1, 1, 900] = -1.0  # an earlier tie in the first tile
    dk[:, :, 1:4] = dk[:, :, 4:5]  # dense keys 1..4 identical (dense = 6)
    k[:, :, 1500] = dk[:, :, 1]  # so the demoted key is closest to them
    k[:, :, 900] = dk[:, :, 1]
    k_new, v_new, _ = make_token(bsz, n_kv, d, torch.float32)
    pos = torch.tensor([s_len, s_len + 100])
    base = torch.tensor([s_len, s_len])
    for metric in ("dot", "l2"):
        check((k, v, w, s, dk, dv), (k_new, v_new, None), pos, base, dense=6, ring=7, policy="merge",
              metric=metric, score_merge="max")


def test_op_is_registered_with_its_mutations():
    schema = torch.ops.zmzoo.slot_insert.default._schema
    mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert mutated == ["k", "v", "w", "s", "dense_k", "dense_v"], str(schema)


def test_compile_fullgraph():
    """torch.compile(fullgraph=True, backend='eager') traces the op (the interpreter rules out AOTAutograd)."""
    state = make_state(2, 2, 17, 64, torch.float32, seed=3, dense=2)
    token = make_token(2, 2, 64, torch.float32)
    pos, base = torch.tensor([10, 30]), torch.tensor([17, 20])

    def step(k, v, w, s, dk, dv, k_new, v_new, s_new, pos, base):
        slot_insert(k, v, w, s, k_new, v_new, s_new, pos, base, dk, dv, dense=2, ring=4, backend="triton")
        return w.sum()

    a = [t.clone() for t in state]
    b = [t.clone() for t in state]
    slot_insert_ref(*a[:4], *token, pos, base, *a[4:], dense=2, ring=4)
    torch.compile(step, fullgraph=True, backend="eager")(*b, *token, pos, base)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("method", ["zeromerge", "h2o", "streaming"])
def test_cache_decode_matches_torch_backend(method):
    """A whole compressed cache (prefill, then decode past the budget) gives the same outputs and buffers with the
    Triton ops as with the torch references (fp32, to rounding)."""
    n_heads, n_kv, d, budget, steps = 4, 2, 64, 16, 12
    cfg = resolve_cache_config(max_seq_len=64, method=method, kv_budget=budget)
    caches = [build_caches(cfg, n_layers=1, batch_size=2, n_heads=n_heads, n_kv_heads=n_kv, head_dim=d,
                           max_seq_len=64, dtype=torch.float32, device="cpu", backend=b)[0]
              for b in ("torch", "triton")]
    gen = torch.Generator().manual_seed(0)
    t_max = 24 + steps
    q = torch.randn(2, n_heads, t_max, d, generator=gen)
    k = torch.randn(2, n_kv, t_max, d, generator=gen)
    v = torch.randn(2, n_kv, t_max, d, generator=gen)
    prompt = [24, 9]  # one row compressed at prefill, one that fills up while decoding
    outs = [[], []]
    for c, cache in enumerate(caches):
        for r, t in enumerate(prompt):
            cache.prefill(q[r : r + 1, :, :t], k[r : r + 1, :, :t], v[r : r + 1, :, :t], r)
        pos = torch.tensor(prompt)
        for _ in range(steps):
            idx = pos.view(2, 1, 1, 1)
            qs = q.gather(2, idx.expand(2, n_heads, 1, d))
            ks = k.gather(2, idx.expand(2, n_kv, 1, d))
            vs = v.gather(2, idx.expand(2, n_kv, 1, d))
            outs[c].append(cache.decode(qs, ks, vs, pos))
            pos = pos + 1
    torch.testing.assert_close(torch.stack(outs[1]), torch.stack(outs[0]), rtol=1e-5, atol=1e-5)
    for name, buf in caches[0].named_buffers():
        torch.testing.assert_close(dict(caches[1].named_buffers())[name], buf, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bf16_dense_slot_keeps_the_weighted_mean(backend):
    """A bf16 dense slot that absorbs 2000 merges stays the weighted mean of exactly the tokens merged into it: its
    fp32 copy to fp32 rounding, the bf16 copy the attention reads equal to that rounded once. (Accumulated in bf16, a
    slot whose weight passed ~256 stopped moving: each merge changed it by less than half an ulp, and after 1000
    merges it was off the true mean by several percent.)"""
    bsz, n_kv, s_len, d, dense, ring = 1, 2, 12, 64, 1, 4
    gen = torch.Generator().manual_seed(5)
    k, v, w, s, dk, dv = make_state(bsz, n_kv, s_len, d, torch.bfloat16, seed=4, dense=dense)
    k, v = k.contiguous(), v.contiguous()
    dk.copy_(k[:, :, :dense].float())
    dv.copy_(v[:, :, :dense].float())
    w.fill_(1.0)
    s.fill_(1.0)
    exact_k, exact_v = dk.double().clone(), dv.double().clone()  # the true means, in float64
    exact_w = w[:, :, :dense].double().clone()
    pos, base = torch.tensor([s_len]), torch.tensor([s_len])
    for _ in range(2000):
        s[:, :, dense + 2] = -1.0  # slot dense + 2 is the lowest-scored candidate: it is merged into slot 0
        i = dense + 2
        k_i, v_i, w_i = k[:, :, i].double(), v[:, :, i].double(), w[:, :, i : i + 1].double()
        k_new = (torch.randn(bsz, n_kv, d, generator=gen) + 2.0).to(torch.bfloat16)  # a mean far from 0
        v_new = torch.randn(bsz, n_kv, d, generator=gen).to(torch.bfloat16)
        slot_insert(k, v, w, s, k_new, v_new, torch.ones(bsz, n_kv), pos, base, dk, dv, dense=dense, ring=ring,
                    policy="merge", backend=backend)
        exact_k = (exact_w * exact_k[:, :, 0] + w_i * k_i).div(exact_w + w_i).unsqueeze(2)
        exact_v = (exact_w * exact_v[:, :, 0] + w_i * v_i).div(exact_w + w_i).unsqueeze(2)
        exact_w = exact_w + w_i
        pos += 1
    assert float(w[0, 0, 0]) == float(exact_w[0, 0, 0]) > 2000
    torch.testing.assert_close(dk.double(), exact_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dv.double(), exact_v, rtol=1e-5, atol=1e-5)
    assert torch.equal(k[:, :, :dense], dk.to(torch.bfloat16)) and torch.equal(v[:, :, :dense], dv.to(torch.bfloat16))

"""The vectorised caches agree with the slow plain-Python oracle (tests/cache/oracle.py), step by step, slot by slot.

Both backends: ``torch`` in float64, float32 and bfloat16, ``triton`` (the kernels, interpreted on a CPU) in float32
and bfloat16, with fewer and shorter histories. The inputs are drawn in float64 and rounded to the cache dtype; the
oracle computes in float64 from those rounded inputs, exactly (no rounding of its own).

Histories draw ``score_window`` / ``score_pool`` for zeromerge and h2o too, and one in ten has a prompt longer than
the scoring window of decay 0.8 (W = 94 queries), which the oracle scores with every query.

Tolerances. ``TOL`` = 2e-5 relative to max(1, |x|) is fp32 arithmetic (scores, softmax, means and merges are fp32
in every dtype). On top of it, what the dtype's resolution makes the cache differ by, with u its unit roundoff
(bf16 2^-8; fp32 2^-24; a float64 cache reads its merged slots in fp32, 2^-24 too):

- The prompt's output (the CPU's flash kernel; bf16 rounds its softmax weights and its output): u relative plus
  2 u max|v|. Its scores: exact but for the kernel's log-sum-exp, which in bf16 is off by up to 2^-13.8 (measured over
  random prompts), so ``PREFILL_REL`` 2^-12 relative more.
- Slots of one token hold it exactly (moved, never computed); weights are exact.
- A merged slot's ``dense_k`` / ``dense_v`` (fp32) equal the oracle's mean to TOL; ``k``, ``v`` there, which the
  attention reads, are those rounded once, so within u relative more.
- Attention: a merged slot's key read rounded moves its logit by at most E = sm * sum_c |q_c| |k_c| * u (computed
  each step from the step's queries and the oracle's merged keys). The slot weights p then move by a factor within
  exp(+-2E), so each step's output by at most expm1(2E) * max|v| + u * max|v_merged|, plus its own rounding to the
  dtype (u relative), and every score, a sum of such weights (merged by max or sum), by at most rho = the largest
  expm1(2E) of the history so far (and ``PREFILL_REL``), relative.
- Decisions: where the oracle's demoted slot, dense slot or prompt top-k is within those tolerances of another
  choice (a near-tie), the cache may take either. At a decode step the comparison checks that the cache's choice is
  within the tolerance of the oracle's best and has the oracle follow it (``ZeroMergeOracle.decode(choose=...)``);
  a near-tie in the prompt's selection (rare: the prompt's scores are fp32-exact) is ``assume``d away. An exact tie
  there (pooled copies of one score) is compared: both keep the earlier position.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import assume, event, given, note
from hypothesis import strategies as st

from tests.conftest import examples
from zmzoo.cache import build_caches, resolve_cache_config

from .oracle import ZeroMergeOracle

TOL = 2e-5
UNIT = {torch.float64: 2.0**-24, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}  # merged slots as attention reads
OUT_UNIT = {torch.float64: 0.0, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8}  # an output's rounding
PREFILL_REL = {torch.float64: 0.0, torch.float32: 0.0, torch.bfloat16: 2.0**-12}  # the prompt scores' lse
W_08 = 94  # decay_window(0.8, T) for T >= 94: ceil(ln(1e-9) / ln(0.8)) + 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of tiny tensor ops: intra-op threads only add contention (restored afterwards)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def score_tol(x: float, rho: float) -> float:
    return rho * abs(x) + TOL * max(1.0, abs(x))


def compare(cache, oracle, n_kv, used, dtype, rho, what):
    """Row 0 of ``cache`` slot by slot against the oracle (see the module docstring for the tolerances)."""
    dense = cache.dense_k.shape[2]
    u = UNIT[dtype]
    for h in range(n_kv):
        slots = oracle.slots(h)
        assert len(slots) == used, what
        for j, sl in enumerate(slots):
            at = f"{what}, head {h} slot {j}"
            assert float(cache.w[0, h, j]) == sl.w, at
            if j < dense:  # the dense region: fp32 means (a token's key and value while it holds one)
                for name, buf, want in (("key", cache.dense_k, sl.key), ("value", cache.dense_v, sl.value)):
                    torch.testing.assert_close(buf[0, h, j].double(), want, rtol=TOL, atol=TOL,
                                               msg=lambda m, at=at, name=name: f"{at} fp32 {name}: {m}")
                for name, buf, want in (("key", cache.k, sl.key), ("value", cache.v, sl.value)):
                    torch.testing.assert_close(buf[0, h, j].double(), want, rtol=TOL + u, atol=TOL,
                                               msg=lambda m, at=at, name=name: f"{at} {name}: {m}")
            else:  # one token, moved: exactly its key and value
                assert sl.w == 1, at
                assert torch.equal(cache.k[0, h, j].double(), sl.key), f"{at}: not token {sl.tokens}'s key"
                assert torch.equal(cache.v[0, h, j].double(), sl.value), f"{at}: not token {sl.tokens}'s value"
            if oracle.policy in ("zeromerge", "h2o"):
                got = float(cache.s[0, h, j])
                assert abs(got - sl.s) <= score_tol(sl.s, rho), f"{at} score {got} vs {sl.s} (rho {rho:.2e})"


def prefill_ties(oracle, t, rho):
    """Whether a compressing selection had two candidate scores across its top-k boundary that are distinct but within
    the tolerance (a near-tie, either side right), and whether it had two equal ones there (pooled copies of one
    value: equal in both, so the tie rule, the earlier position, decides alike)."""
    near = exact = False
    if t <= oracle.budget or oracle.policy == "streaming":
        return near, exact
    for h in range(oracle.n_kv_heads):
        scores = oracle.last_prefill_scores[h][: t - oracle.tail]
        kept = {sl.tokens[0] for sl in oracle.slots(h)[oracle.dense :]}
        a = [scores[j] for j in kept if j < t - oracle.tail]
        b = [scores[j] for j in range(t - oracle.tail) if j not in kept]
        near |= any(x != y and abs(x - y) <= score_tol(x, rho) + score_tol(y, rho) for x in a for y in b)
        exact |= bool(set(a) & set(b))
    return near, exact


def logit_shift(oracle, q, dtype, scale):
    """Per KV head: E, the most a merged slot's key rounded to what the attention reads moves a logit of this step's
    queries q (H, hd)."""
    u, out = UNIT[dtype], []
    for g in range(oracle.n_kv_heads):
        qs = q[g * oracle.group : (g + 1) * oracle.group].double().abs()
        merged = [sl.key.abs() for sl in oracle.slots(g)[: oracle.dense] if sl.w > 1]
        out.append(max((float((qs @ key).max()) * scale * u for key in merged), default=0.0))
    return out


def cache_choices(cache, oracle_before, prev_k, prev_w):
    """Per KV head, (i, j) the cache took at a full zeromerge/h2o step, found from its slots: i the candidate slot
    that now holds the ring's oldest token (keys are moved exactly; random keys are distinct), j the dense slot whose
    weight grew. None where that does not find exactly one (then the slot comparison says what is wrong)."""
    orc = oracle_before
    n_idx = orc.ring_start + orc.ptr
    lo = orc.dense if orc.policy == "zeromerge" else 0
    out = {}
    for h in range(orc.n_kv_heads):
        now = cache.k[0, h, lo : orc.ring_start]
        i = (now == prev_k[h, n_idx]).all(-1).nonzero().flatten().tolist()
        j = (cache.w[0, h, : orc.dense] != prev_w[h, : orc.dense]).nonzero().flatten().tolist()
        if len(i) == 1 and (orc.policy == "h2o" or len(j) == 1):
            out[h] = (lo + i[0], j[0] if orc.policy == "zeromerge" else None)
    return out


def follow_near_ties(oracle_before, oracle, took, q, k, v, rho):
    """The oracle after this step, made to take the cache's choices ``took`` where they differ from its own and are
    within the tolerances of its best (asserted), and whether it had to; ``oracle`` itself where the cache chose as it
    did."""
    followed = False
    for _ in range(2):  # the demoted slot, then the dense slot nearest to it
        follow = {}
        for h, (i, j) in took.items():
            ch = oracle.last_choices[h]
            if (i, j) == (ch["i"], ch.get("j")):
                continue
            if i != ch["i"]:
                best, mine = min(ch["scores"]), ch["scores"][ch["candidates"].index(i)]
                assert mine - score_tol(mine, rho) <= best + score_tol(best, rho), (
                    f"head {h}: the cache demoted slot {i} (score {mine}), the oracle slot {ch['i']} ({best})")
                follow[h] = (i, None)
            else:
                m = ch["metric"]
                best, mine = (max(m), m[j]) if oracle.metric == "dot" else (min(m), m[j])
                assert abs(mine - best) <= TOL * max(1.0, abs(best)) * 2, (
                    f"head {h}: the cache merged into dense slot {j} ({mine}), the oracle into {ch['j']} ({best})")
                follow[h] = (i, j)
        if not follow:
            return oracle, followed
        for h, ch in enumerate(oracle.last_choices):  # keep what the oracle already follows
            follow.setdefault(h, (ch["i"], ch.get("j")))
        followed = True
        oracle = copy.deepcopy(oracle_before)
        oracle.decode(q, k, v, choose=follow)
    took_now = {h: (ch["i"], ch.get("j")) for h, ch in enumerate(oracle.last_choices)}
    assert all(took_now[h] == ij for h, ij in took.items()), (took, took_now)
    return oracle, followed


@st.composite
def histories(draw, small=False):
    """A valid configuration (by construction: nothing drawn is skipped) and a history's sizes."""
    policy = draw(st.sampled_from(["zeromerge", "zeromerge", "h2o", "streaming", "snapkv"]))
    budget = draw(st.integers(6, 12 if small else 16))
    c = {"policy": policy, "budget": budget, "n_kv": draw(st.integers(1, 2)), "group": draw(st.sampled_from([1, 3])),
         "t": draw(st.integers(1, 24 if small else 36)), "steps": draw(st.integers(1, 10 if small else 24)),
         "seed": draw(st.integers(0, 2**16))}
    decay = draw(st.sampled_from([0.98, 0.8, 1.0]))
    if policy in ("zeromerge", "h2o") and draw(st.integers(0, 9)) == 0:
        # past the prefill scoring window: decay 0.8 scores only the last 94 queries, the oracle all of them
        c.update(t=draw(st.integers(W_08 + 1, W_08 + (12 if small else 26))), n_kv=1,
                 group=draw(st.sampled_from([1, 2])))
        decay = 0.8
    window = draw(st.sampled_from([None, None, None, 1, 4, 16])) if c["t"] <= W_08 else None
    pool = draw(st.sampled_from([None, None, 1, 3, 5]))
    if policy == "zeromerge":
        dense = draw(st.integers(1, 3))
        tail = draw(st.integers(2, min(5, budget - dense - 1)))
        c["kw"] = dict(kv_budget=budget, tail=tail, dense=dense, metric=draw(st.sampled_from(["dot", "l2"])),
                       score_merge=draw(st.sampled_from(["max", "sum"])), decay=decay,
                       logw_scale=draw(st.sampled_from([1.0, 0.6])), score_window=window, score_pool=pool)
        c["okw"] = {k: c["kw"][k] for k in ("tail", "dense", "metric", "score_merge", "decay", "logw_scale",
                                             "score_window", "score_pool")}
    elif policy == "h2o":
        tail = draw(st.integers(2, min(5, budget - 1)))
        c["kw"] = dict(kv_budget=budget, tail=tail, decay=decay, score_window=window, score_pool=pool)
        c["okw"] = dict(tail=tail, dense=0, decay=decay, score_window=window, score_pool=pool)
    elif policy == "snapkv":
        tail = draw(st.integers(2, min(5, budget - 1)))
        window, pool = draw(st.sampled_from([4, 1, 32])), draw(st.sampled_from([3, 1, 5]))
        c["kw"] = dict(kv_budget=budget, tail=tail, score_window=window, score_pool=pool)
        c["okw"] = dict(tail=tail, dense=0, score_window=window, score_pool=pool)
    else:
        sinks = draw(st.integers(0, min(4, budget - 2)))
        c["kw"] = dict(kv_budget=budget, sinks=sinks)
        c["okw"] = dict(tail=budget - sinks + 1, dense=0, sinks=sinks)
    return c


def check_agreement(c, backend, dtype):
    policy, n_kv, budget, t, steps = c["policy"], c["n_kv"], c["budget"], c["t"], c["steps"]
    n_heads, hd = n_kv * c["group"], 8 if backend == "torch" else 16
    cfg = resolve_cache_config(max_seq_len=256, method=policy, **c["kw"])
    cache = build_caches(cfg, n_layers=1, batch_size=1, n_heads=n_heads, n_kv_heads=n_kv, head_dim=hd,
                         max_seq_len=256, dtype=dtype, device="cpu", backend=backend)[0]
    oracle = ZeroMergeOracle(n_heads, n_kv, hd, budget, policy=policy, **c["okw"])
    g = torch.Generator().manual_seed(c["seed"])
    q = torch.randn(n_heads, t + steps, hd, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(n_kv, t + steps, hd, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(n_kv, t + steps, hd, generator=g, dtype=torch.float64).to(dtype)
    out_c = cache.prefill(q[None, :, :t], k[None, :, :t], v[None, :, :t], 0)[0]
    out_o = oracle.prefill(q[:, :t], k[:, :t], v[:, :t])
    rho = [PREFILL_REL[dtype]] * n_kv  # per KV head: the scores' relative tolerance so far (module docstring)
    near, exact = prefill_ties(oracle, t, rho[0])
    assume(not near)
    if exact:
        event("a tie across the prompt's top-k boundary (pooled copies): the earlier position kept")
    event(f"{policy}: {'prompt past the scoring window' if t > W_08 else 'compressed' if t > budget else 'fits'}")
    u_out = OUT_UNIT[dtype]
    torch.testing.assert_close(out_c.double(), out_o, rtol=TOL + u_out,
                               atol=TOL + 2 * u_out * float(v[:, :t].double().abs().max()))
    compare(cache, oracle, n_kv, min(t, budget), dtype, max(rho), "after prefill")
    scored = policy in ("zeromerge", "h2o")
    for i in range(steps):
        p = t + i
        before = copy.deepcopy(oracle) if scored and oracle.is_full() else None
        prev_k, prev_w = cache.k[0].clone(), cache.w[0].clone()
        shift = logit_shift(oracle, q[:, p], dtype, 1 / math.sqrt(hd))
        vmax = [float(v[h, : p + 1].double().abs().max()) for h in range(n_kv)]
        vmerged = [max((float(sl.value.abs().max()) for sl in oracle.slots(h)[: oracle.dense] if sl.w > 1),
                       default=0.0) for h in range(n_kv)]
        oc = cache.decode(q[None, :, p, None], k[None, :, p, None], v[None, :, p, None], torch.tensor([p]))[0, :, 0]
        oo = oracle.decode(q[:, p], k[:, p], v[:, p])
        for h in range(n_heads):
            g_ = h // c["group"]
            atol = TOL + math.expm1(2 * shift[g_]) * vmax[g_] + UNIT[dtype] * vmerged[g_]
            torch.testing.assert_close(oc[h].double(), oo[h], rtol=TOL + OUT_UNIT[dtype], atol=atol,
                                       msg=lambda m, h=h, p=p: f"step {p} head {h} output: {m}")
        rho = [max(r, math.expm1(2 * e)) for r, e in zip(rho, shift)]
        if before is not None:
            took = cache_choices(cache, before, prev_k, prev_w)
            oracle, followed = follow_near_ties(before, oracle, took, q[:, p], k[:, p], v[:, p], max(rho))
            if followed:
                event("near-tie: the oracle follows the cache's choice")
                note(f"step {p}: the oracle follows the cache's choices {took}")
        compare(cache, oracle, n_kv, min(p + 1, budget), dtype, max(rho), f"after decoding position {p}")
    if dtype == torch.bfloat16 and policy == "zeromerge":
        event(f"bf16 score tolerance rho: {'0' if max(rho) == 0 else f'~2^{round(math.log2(max(rho)))}'}")


@st.composite
def torch_dtypes(draw):
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
    event(f"dtype {str(dtype).removeprefix('torch.')}")
    return dtype


@examples(150)
@given(dtype=torch_dtypes(), c=histories())
def test_cache_matches_oracle(dtype, c):
    check_agreement(c, "torch", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@examples(4)
@given(c=histories(small=True))
def test_cache_matches_oracle_triton(dtype, c):
    check_agreement(c, "triton", dtype)


def test_following_a_near_tie_takes_an_admissible_choice_only():
    """``follow_near_ties`` (no random history reaches it in CI): a choice other than the oracle's is followed when
    the tolerance admits it, and refused when it does not."""
    orc = ZeroMergeOracle(2, 1, 4, budget=7, tail=2, dense=2)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(n, 13, 4, generator=g, dtype=torch.float64) for n in (2, 1, 1))
    orc.prefill(q[:, :12], k[:, :12], v[:, :12])
    before = copy.deepcopy(orc)
    orc.decode(q[:, 12], k[:, 12], v[:, 12])
    ch = orc.last_choices[0]
    other = ch["candidates"][max(range(len(ch["scores"])), key=ch["scores"].__getitem__)]  # the highest score
    assert other != ch["i"]
    forced = copy.deepcopy(before)
    forced.decode(q[:, 12], k[:, 12], v[:, 12], choose={0: (other, None)})
    took = {0: (other, forced.last_choices[0]["j"])}
    got, followed = follow_near_ties(before, orc, took, q[:, 12], k[:, 12], v[:, 12], rho=1e3)
    assert followed and (got.last_choices[0]["i"], got.last_choices[0]["j"]) == took[0]
    assert [sl.tokens for sl in got.slots(0)] == [sl.tokens for sl in forced.slots(0)]
    with pytest.raises(AssertionError, match="the cache demoted slot"):
        follow_near_ties(before, orc, took, q[:, 12], k[:, 12], v[:, 12], rho=0.0)
    with pytest.raises(AssertionError, match="merged into dense slot"):  # the dense slot: the metric's tolerance
        follow_near_ties(before, orc, {0: (ch["i"], 1 - ch["j"])}, q[:, 12], k[:, 12], v[:, 12], rho=1e3)
    same, followed = follow_near_ties(before, orc, {0: (ch["i"], ch["j"])}, q[:, 12], k[:, 12], v[:, 12], rho=0.0)
    assert same is orc and not followed

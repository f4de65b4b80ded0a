"""Parity and speed of zmzoo's Triton ops (decode_attention, slot_insert, prefill_scores) against their references.

    python -m bench.probes.ops --out OUT          # CUDA: parity at LLaMA-2-7B sizes, copy bandwidth, timings (~2-3 min)
    python -m bench.probes.ops --cpu --out OUT    # no GPU: Triton's interpreter, tiny sizes, parity and compile only

(a) Parity, on LLaMA-2-7B shapes (32 heads, 32 KV heads, D=128) and a GQA variant (32/8), bf16 unless noted:
    decode attention: max abs/rel error of ``out`` against the reference on fp32-upcast inputs must be at most twice
    the bf16 reference's own error (flash-attn's rule); ``scores`` and ``new_score`` (fp32) within rtol 1e-4.
    slot insert: several decode steps from a common state: w and s equal exactly (same slot choices), k and v within
    one rounding. prefill scores: within rtol 1e-3 of the reference (both fp32 math on the same inputs).
(b) Copy bandwidth: a 2 GiB device-to-device copy, bytes read + written, median of 10.
(c) Timing: each op call is captured in a CUDA graph that cycles through enough copies of the inputs to exceed the L2
    (>= 256 MB, or 8 calls on one copy when one is larger), so figures are HBM figures without launch overhead;
    time = median over replays of graph time / calls. "bytes" = what the op must move at the least (decode: K, V, w,
    scores read+written, q, out; slot insert: the candidate scores, dense keys and the slots it reads and writes;
    prefill: K, Q, lse, scores once), GB/s = bytes / time, and the fraction of the copy bandwidth. The torch
    reference is timed the same way.
(d) Sweep of the decode kernel's launch settings (BLOCK_N, warps, stages, splits) at a few sizes, against the
    defaults, to tune them.
(e) torch.compile(fullgraph=True, mode="reduce-overhead") of a cache-like module whose buffers the ops mutate:
    equal to eager, one graph, no "skipping cudagraphs".

Writes OUT/ops.json and prints tables; exits 1 when any parity or compile check failed.
"""

from __future__ import annotations

import os
import sys

if "--cpu" in sys.argv:  # must precede the first kernel launch (kernels are decorated lazily, see zmzoo.ops._launch)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import json
import math
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from bench.timing import copy_bandwidth
from zmzoo.environment import environment
from zmzoo.ops._interpreter import fix_interpreter_bf16
from zmzoo.ops._launch import time_graph
from zmzoo.ops.decode_attention import (
    NUM_STAGES,
    WAVES,
    _decode_attention_launch,
    decode_attention,
    decode_attention_config,
    decode_attention_ref,
)
from zmzoo.ops.gemv import CANDIDATES, for_rows, gemv, gemv_config
from zmzoo.ops.prefill_scores import decay_window, prefill_scores, prefill_scores_ref
from zmzoo.ops.slot_insert import slot_insert, slot_insert_ref

MODELS = {"mha": (32, 32), "gqa": (32, 8)}  # LLaMA-2-7B (n_heads, n_kv_heads), and a GQA variant
HEAD_DIM = 128
SLOTS = (256, 512, 1024, 2048, 4096, 8192)
FULL_SLOTS = 40960
L2_FLUSH_BYTES = 256 * 2**20
DECAY, LOGW_SCALE = 0.98, 1.0
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[ops {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------------- inputs
def decode_inputs(bsz, n_heads, n_kv, s_len, d, dtype, device, *, kind="zm", rows=None, seed=0):
    """kind "zm": the compressed cache's call (w, scores, new token); "full": the full cache's (slots only)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(bsz, n_heads, d, generator=gen, device=device).to(dtype)
    k = torch.randn(bsz, n_kv, s_len, d, generator=gen, device=device).to(dtype)
    v = torch.randn(bsz, n_kv, s_len, d, generator=gen, device=device).to(dtype)
    rows = rows or [(0, s_len)] * bsz
    start = torch.tensor([r[0] for r in rows], device=device)
    end = torch.tensor([r[1] for r in rows], device=device)
    inp = dict(q=q, k=k, v=v, start=start, end=end, k_new=None, v_new=None, w=None, scores=None)
    if kind == "zm":
        inp["k_new"] = torch.randn(bsz, n_kv, d, generator=gen, device=device).to(dtype)
        inp["v_new"] = torch.randn(bsz, n_kv, d, generator=gen, device=device).to(dtype)
        inp["w"] = torch.randint(1, 9, (bsz, n_kv, s_len), generator=gen, device=device).float()
        inp["scores"] = torch.rand(bsz, n_kv, s_len, generator=gen, device=device)
    return inp


def decode_bytes(inp) -> int:
    q, k = inp["q"], inp["k"]
    e = k.element_size()
    n = 2 * k.numel() * e + 2 * q.numel() * q.element_size()
    if inp["w"] is not None:
        n += 4 * inp["w"].numel()
    if inp["scores"] is not None:
        n += 8 * inp["scores"].numel()
    if inp["k_new"] is not None:
        n += 2 * inp["k_new"].numel() * e
    return n


def slot_inputs(bsz, n_kv, s_len, d, dtype, device, *, seed=0, dense=1):
    """k, v, w, s and the fp32 dense slots (k, v's first ``dense`` slots their rounded copies, as the cache keeps
    them)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    k = torch.randn(bsz, n_kv, s_len, d, generator=gen, device=device).to(dtype)
    v = torch.randn(bsz, n_kv, s_len, d, generator=gen, device=device).to(dtype)
    w = torch.randint(1, 6, (bsz, n_kv, s_len), generator=gen, device=device).float()
    s = torch.rand(bsz, n_kv, s_len, generator=gen, device=device)
    return [k, v, w, s, k[:, :, :dense].float().contiguous(), v[:, :, :dense].float().contiguous()]


def slot_token(bsz, n_kv, d, dtype, device, *, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed + 12345)
    return (torch.randn(bsz, n_kv, d, generator=gen, device=device).to(dtype),
            torch.randn(bsz, n_kv, d, generator=gen, device=device).to(dtype),
            torch.rand(bsz, n_kv, generator=gen, device=device))


def slot_bytes(bsz, n_kv, s_len, d, e, dense, ring, policy) -> int:
    lo = dense if policy == "merge" else 0
    per_head = 4 * (s_len - ring - lo) if policy != "ring" else 0
    per_head += dense * d * e if policy == "merge" else 0
    slots = {"merge": 3, "evict": 2, "ring": 1}[policy]
    per_head += slots * 2 * (2 * d * e + 8)  # read and write k, v, w, s of the slots touched
    return bsz * n_kv * per_head


def prefill_inputs(n_heads, n_kv, t, d, dtype, device, *, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(n_heads, t, d, generator=gen, device=device).to(dtype)
    k = torch.randn(n_kv, t, d, generator=gen, device=device).to(dtype)
    return q, k


# ---------------------------------------------------------------------------------------------------- parity
def err_stats(got: torch.Tensor, want: torch.Tensor) -> dict[str, float]:
    diff = (got.double() - want.double()).abs()
    scale = want.double().abs().max().item()
    return {"max_abs": diff.max().item(), "max_rel": diff.max().item() / max(scale, 1e-30)}


def close(got, want, rtol, atol) -> bool:
    return bool(((got.double() - want.double()).abs() <= atol + rtol * want.double().abs()).all())


def parity_decode(name, inp, **kw) -> dict[str, Any]:
    def clone(d, dtype=None):
        out = {}
        for key, t in d.items():
            if t is None:
                out[key] = None
            elif dtype is not None and t.is_floating_point() and key not in ("w", "scores"):
                out[key] = t.to(dtype)
            else:
                out[key] = t.clone()
        return out

    a, b, c = clone(inp), clone(inp), clone(inp, torch.float32)
    out, ns = decode_attention(**a, backend="triton", **kw)
    out_ref, ns_ref = decode_attention_ref(**b, **kw)
    out_exact, _ = decode_attention_ref(**c, **kw)
    rec: dict[str, Any] = {"op": "decode_attention", "case": name, "dtype": str(inp["q"].dtype)}
    rec["out"] = err_stats(out, out_exact)
    rec["out_ref_err"] = err_stats(out_ref, out_exact)
    if inp["q"].dtype == torch.float32:
        ok = rec["out"]["max_abs"] <= 1e-4 * max(out_exact.abs().max().item(), 1.0)
    else:
        ok = rec["out"]["max_abs"] <= 2 * rec["out_ref_err"]["max_abs"] + 1e-6
    if inp["scores"] is not None:
        rec["scores"] = err_stats(a["scores"], b["scores"])
        ok &= close(a["scores"], b["scores"], 1e-4, 1e-6)
    if ns_ref is not None:
        rec["new_score"] = err_stats(ns, ns_ref)
        ok &= close(ns, ns_ref, 1e-4, 1e-6)
    rec["ok"] = bool(ok)
    return rec


def parity_slot(name, state, pos, base, steps, **kw) -> dict[str, Any]:
    k = state[0]
    bsz, n_kv, _, d = k.shape
    rec: dict[str, Any] = {"op": "slot_insert", "case": name, "dtype": str(k.dtype), "steps": steps}
    worst = {"k": 0.0, "v": 0.0}
    same_choice = True
    ok = True
    ref_state = [t.clone() for t in state]
    for step in range(steps):
        got = [t.clone() for t in ref_state]  # both start every step from the reference's state
        token = slot_token(bsz, n_kv, d, k.dtype, k.device, seed=step)
        slot_insert_ref(*ref_state[:4], *token, pos + step, base, *ref_state[4:], **kw)
        slot_insert(*got[:4], *token, pos + step, base, *got[4:], backend="triton", **kw)
        same_choice &= torch.equal(got[2], ref_state[2]) and torch.equal(got[3], ref_state[3])
        tol = 2.0 ** -7 if k.dtype == torch.bfloat16 else (2.0 ** -10 if k.dtype == torch.float16 else 1e-6)
        for i, key in ((0, "k"), (1, "v")):
            worst[key] = max(worst[key], (got[i].float() - ref_state[i].float()).abs().max().item())
            ok &= close(got[i], ref_state[i], tol, 1e-6)
    rec.update(max_abs_k=worst["k"], max_abs_v=worst["v"], same_slot_choices=bool(same_choice))
    rec["ok"] = bool(ok and same_choice)
    return rec


def parity_prefill(name, q, k, n_q, decay) -> dict[str, Any]:
    t = k.shape[1]
    qq = q[:, t - n_q :]
    got = prefill_scores(qq, k, decay=decay, backend="triton")
    want = prefill_scores_ref(qq, k, decay=decay)
    rec = {"op": "prefill_scores", "case": name, "dtype": str(q.dtype), **err_stats(got, want)}
    rec["ok"] = close(got, want, 1e-3, 1e-6)
    return rec


def run_parity(device, cpu: bool) -> list[dict[str, Any]]:
    bf16 = torch.bfloat16
    res = []
    if cpu:
        d, s_len, models = 64, 70, {"mha": (4, 4), "gqa": (8, 2)}
    else:
        d, s_len, models = HEAD_DIM, 2048, MODELS
    for model, (h, hkv) in models.items():
        rows = [(0, s_len), (0, s_len // 2 + 3), (17, s_len), (5, 6)]
        cases = [
            (f"{model} zm B=4 S={s_len}", dict(bsz=4, s_len=s_len, dtype=bf16, kind="zm", rows=rows)),
            (f"{model} zm B=1 S={s_len} fp32", dict(bsz=1, s_len=s_len, dtype=torch.float32, kind="zm", rows=None)),
            (f"{model} zm B=2 S={s_len} fp16", dict(bsz=2, s_len=s_len, dtype=torch.float16, kind="zm", rows=None)),
        ]
        full = 96 if cpu else FULL_SLOTS
        cases.append((f"{model} full B=2 S={full}", dict(bsz=2, s_len=full, dtype=bf16, kind="full",
                                                         rows=[(0, full), (full // 3, full - 1000 if not cpu
                                                                           else full - 10)])))
        for name, c in cases:
            inp = decode_inputs(c["bsz"], h, hkv, c["s_len"], d, c["dtype"], device, kind=c["kind"], rows=c["rows"])
            res.append(parity_decode(name, inp, logw_scale=0.6 if c["kind"] == "zm" else 1.0, decay=DECAY))
            log(f"parity {res[-1]['case']}: ok={res[-1]['ok']}")
        # slot insert: every policy, appending and full rows, ring wrap-around over the steps
        n_slots = 40 if cpu else s_len
        ring = max(2, n_slots // 10 - 1)
        pos = torch.tensor([n_slots - 2, n_slots, 3 * n_slots + 5, n_slots + 7], device=device)
        base = torch.tensor([n_slots, n_slots, n_slots + 100, n_slots + 3], device=device)
        for policy, metric, merge, dense, dtype in [("merge", "dot", "max", 1, bf16), ("merge", "l2", "sum", 20, bf16),
                                                    ("merge", "dot", "max", 20, torch.float32),
                                                    ("evict", "dot", "max", 1, bf16), ("ring", "dot", "max", 1, bf16)]:
            state = slot_inputs(4, hkv, n_slots, d, dtype, device, seed=dense, dense=dense)
            res.append(parity_slot(f"{model} {policy}/{metric}/{merge} dense={dense} S={n_slots}", state, pos, base,
                                   steps=4, dense=dense, ring=ring, policy=policy, metric=metric, score_merge=merge))
            log(f"parity {res[-1]['case']} {dtype}: ok={res[-1]['ok']}")
        # prefill scores: the 0.98 window of a long prompt, a short fp32 prompt, the undecayed SnapKV window
        t_long = 160 if cpu else 4096
        for name, t, dtype, n_q, decay in [(f"{model} T={t_long}", t_long, bf16, decay_window(DECAY, t_long), DECAY),
                                           (f"{model} T=300 fp32", 300, torch.float32, 300, DECAY),
                                           (f"{model} T={t_long} window 32", t_long, bf16, 32, 1.0)]:
            q, k = prefill_inputs(h, hkv, t, d, dtype, device)
            res.append(parity_prefill(name, q, k, n_q, decay))
            log(f"parity prefill {name}: ok={res[-1]['ok']}")
    return res


# ---------------------------------------------------------------------------------------------------- timing
def n_copies(bytes_per_call: int) -> int:
    return max(1, min(64, math.ceil(L2_FLUSH_BYTES / max(bytes_per_call, 1))))


def timed(rec, key, fn_sets):
    try:
        rec[key] = time_graph(fn_sets)
    except Exception as e:  # keep going: one failed timing must not lose the rest
        rec[key] = None
        rec.setdefault("errors", []).append(f"{key}: {type(e).__name__}: {e}")
        torch.cuda.synchronize()


def finish(rec, bw):
    t = rec.get("triton_s")
    if t:
        rec["gb_per_s"] = rec["bytes"] / t / 1e9
        rec["frac_copy_bw"] = rec["bytes"] / t / bw
    if t and rec.get("torch_s"):
        rec["speedup_vs_torch"] = rec["torch_s"] / t
    return rec


def time_decode(device, bw, budget_s) -> list[dict[str, Any]]:
    res = []
    configs = [(m, b, s, "zm") for m in MODELS for b in (1, 8) for s in SLOTS]
    configs += [(m, b, FULL_SLOTS, "full") for m in MODELS for b in (1, 8)]
    for model, bsz, s_len, kind in configs:
        h, hkv = MODELS[model]
        one = decode_inputs(bsz, h, hkv, s_len, HEAD_DIM, torch.bfloat16, device, kind=kind)
        nbytes = decode_bytes(one)
        sets = [one] + [decode_inputs(bsz, h, hkv, s_len, HEAD_DIM, torch.bfloat16, device, kind=kind, seed=i)
                        for i in range(1, n_copies(nbytes))]
        rec = {"op": "decode_attention", "model": model, "call": kind, "batch": bsz, "slots": s_len,
               "bytes": nbytes, "n_splits": decode_attention_config(bsz, hkv, s_len, HEAD_DIM, device)[1]}
        timed(rec, "triton_s", [lambda a=a: decode_attention(**a, decay=DECAY, backend="triton") for a in sets])
        if time.perf_counter() - T0 < budget_s:
            timed(rec, "torch_s", [lambda a=a: decode_attention_ref(**a, decay=DECAY) for a in sets])
        res.append(finish(rec, bw))
        log(row(rec))
        del sets, one
        torch.cuda.empty_cache()
    return res


def time_slot(device, bw) -> list[dict[str, Any]]:
    res = []
    for model, s_len in [(m, s) for m in MODELS for s in SLOTS]:
        _, hkv = MODELS[model]
        dense, ring = 1, max(1, s_len // 10 - 1)  # ZeroMerge defaults: one dense slot, tail 0.1 * budget
        nbytes = slot_bytes(1, hkv, s_len, HEAD_DIM, 2, dense, ring, "merge")
        sets = [slot_inputs(1, hkv, s_len, HEAD_DIM, torch.bfloat16, device, seed=i, dense=dense)
                for i in range(n_copies(2 * 1 * hkv * s_len * HEAD_DIM * 2))]
        token = slot_token(1, hkv, HEAD_DIM, torch.bfloat16, device)
        pos = torch.tensor([s_len + 5], device=device)
        base = torch.tensor([s_len], device=device)
        kw = dict(dense=dense, ring=ring, policy="merge", metric="dot", score_merge="max")
        rec = {"op": "slot_insert", "model": model, "batch": 1, "slots": s_len, "bytes": nbytes, "dense": dense,
               "ring": ring}
        timed(rec, "triton_s", [lambda st=st: slot_insert(*st[:4], *token, pos, base, *st[4:], backend="triton", **kw)
                                for st in sets])
        timed(rec, "torch_s", [lambda st=st: slot_insert_ref(*st[:4], *token, pos, base, *st[4:], **kw) for st in sets])
        res.append(finish(rec, bw))
        log(row(rec))
        del sets
        torch.cuda.empty_cache()
    return res


def time_prefill(device, bw) -> list[dict[str, Any]]:
    res = []
    for model, t in [(m, s) for m in MODELS for s in SLOTS]:
        h, hkv = MODELS[model]
        n_q = decay_window(DECAY, t)
        q, k = prefill_inputs(h, hkv, t, HEAD_DIM, torch.bfloat16, device)
        qq = q[:, t - n_q :]
        pairs = n_q * (t - n_q) + n_q * (n_q + 1) // 2  # causal (query, key) pairs
        rec = {"op": "prefill_scores", "model": model, "batch": 1, "slots": t, "queries": n_q,
               "bytes": (hkv * t + h * n_q) * HEAD_DIM * 2 + 4 * (h * n_q + hkv * t), "flops": 4 * h * pairs * HEAD_DIM}
        timed(rec, "triton_s", [lambda: prefill_scores(qq, k, decay=DECAY, backend="triton")])
        timed(rec, "torch_s", [lambda: prefill_scores_ref(qq, k, decay=DECAY)])
        if rec.get("triton_s"):
            rec["tflop_per_s"] = rec["flops"] / rec["triton_s"] / 1e12
        res.append(finish(rec, bw))
        log(row(rec))
        torch.cuda.empty_cache()
    return res


SWEEP = [  # (BLOCK_N, num_warps, num_stages, programs per SM); the first is the default (warps None: the kernel's
    # own choice, NUM_WARPS for GQA groups and NUM_WARPS_MHA for a lone query head)
    (decode_attention_config(1, 1, 1 << 20, HEAD_DIM, "cpu")[0], None, NUM_STAGES, WAVES),
    (32, 2, 3, 8), (64, 2, 2, 4), (64, 2, 3, 8), (32, 2, 3, 16), (32, 1, 3, 8), (32, 4, 3, 8), (16, 2, 3, 8),
    (32, 2, 2, 8), (32, 2, 4, 8), (128, 4, 2, 4), (64, 4, 2, 4),
    # fewer, longer programs: at batch 1 and ~2K slots the default gives each program 2 tiles in ~2 waves, and the
    # kernel ran at 41 % of the copy bandwidth on the H200 (latency-bound); these keep one wave with 4-16 tiles each
    (32, 2, 3, 2), (32, 4, 3, 2), (32, 4, 3, 1), (64, 4, 3, 2), (64, 4, 3, 1), (128, 4, 3, 1),
]


def sweep_decode(device, bw, budget_s) -> list[dict[str, Any]]:
    from zmzoo.ops._launch import sm_count

    res = []
    sizes = [("mha", 1, 2048, "zm"), ("gqa", 1, 2048, "zm"), ("mha", 1, 8192, "zm"), ("mha", 8, 8192, "zm"),
             ("gqa", 8, 8192, "zm"),
             ("mha", 1, FULL_SLOTS, "full"), ("gqa", 1, FULL_SLOTS, "full")]
    for model, bsz, s_len, kind in sizes:
        h, hkv = MODELS[model]
        one = decode_inputs(bsz, h, hkv, s_len, HEAD_DIM, torch.bfloat16, device, kind=kind)
        nbytes = decode_bytes(one)
        sets = [one] + [decode_inputs(bsz, h, hkv, s_len, HEAD_DIM, torch.bfloat16, device, kind=kind, seed=i)
                        for i in range(1, n_copies(nbytes))]
        for block_n, warps, stages, waves in SWEEP:
            if time.perf_counter() - T0 > budget_s:
                log("sweep: time budget reached, stopping")
                return res
            n_splits = -(-waves * sm_count(device) // (bsz * hkv))
            kw = dict(block_n=block_n, n_splits=n_splits, num_warps=warps, num_stages=stages)
            rec = {"op": "decode_attention", "model": model, "call": kind, "batch": bsz, "slots": s_len,
                   "bytes": nbytes, "block_n": block_n, "num_warps": warps, "num_stages": stages,
                   "programs_per_sm": waves}
            timed(rec, "triton_s", [lambda a=a: _decode_attention_launch(
                **a, logw_scale=LOGW_SCALE, decay=DECAY, sm_scale=HEAD_DIM**-0.5, **kw) for a in sets])
            res.append(finish(rec, bw))
            log(f"sweep {model} B={bsz} S={s_len} {kind} BLOCK_N={block_n} warps={warps} stages={stages} "
                f"waves={waves}: " + (f"{rec['triton_s'] * 1e6:.1f} us, {rec['frac_copy_bw']:.0%} of copy"
                                      if rec.get("triton_s") else f"failed {rec.get('errors')}"))
        del sets, one
        torch.cuda.empty_cache()
    return res


GEMV_SHAPES = {  # LLaMA-2-7B's decode products (N, K): fused q|k|v, attention output, fused gate|up, down, LM head
    "wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008), "output": (32000, 4096)}


def time_gemv(device, bw, budget_s) -> list[dict[str, Any]]:
    """The Triton GEMV against F.linear (cuBLAS) at LLaMA-2-7B's decode shapes, 1 and 4 rows, bf16; each checked
    first (error against fp64 at most twice F.linear's), then timed at the default and every tuning candidate."""
    res = []
    for name, (n, k) in GEMV_SHAPES.items():
        for m in (1, 4):
            g = torch.Generator(device=device).manual_seed(n + m)
            nbytes = 2 * (n * k + m * (n + k))
            sets = [(torch.randn(m, k, device=device, generator=g, dtype=torch.bfloat16),
                     (torch.randn(n, k, device=device, generator=g) / k**0.5).to(torch.bfloat16))
                    for _ in range(n_copies(nbytes))]
            x, w = sets[0]
            exact = x.double() @ w.double().T
            err_torch = (F.linear(x, w).double() - exact).abs().max().item()
            err = (gemv(x, w, backend="triton").double() - exact).abs().max().item()
            default = gemv_config(m)
            settings = list(dict.fromkeys([default] + [for_rows(c, m) for c in CANDIDATES]))
            for cfg in settings:
                if time.perf_counter() - T0 > budget_s and cfg != default:
                    break
                rec = {"op": "gemv", "model": name, "call": "n{}k{}w{}s{}".format(*cfg), "batch": m, "slots": k,
                       "n": n, "bytes": nbytes, "block_n": cfg.block_n, "block_k": cfg.block_k,
                       "num_warps": cfg.num_warps, "num_stages": cfg.num_stages, "default": cfg == default,
                       "max_abs_err": err, "torch_max_abs_err": err_torch, "ok": err <= 2 * err_torch + 1e-6}
                timed(rec, "triton_s", [lambda a=a, c=cfg: gemv(*a, backend="triton", config=c) for a in sets])
                timed(rec, "torch_s", [lambda a=a: F.linear(*a) for a in sets])
                res.append(finish(rec, bw))
                log(f"gemv {name} ({n} x {k}) rows={m} (BLOCK_N, BLOCK_K, warps, stages)={tuple(cfg)}: "
                    + (f"triton {rec['triton_s'] * 1e6:.1f} us ({rec['frac_copy_bw']:.0%} of copy), "
                       if rec.get("triton_s") else "triton failed, ")
                    + (f"F.linear {rec['torch_s'] * 1e6:.1f} us ({rec['bytes'] / rec['torch_s'] / bw:.0%})"
                       if rec.get("torch_s") else "F.linear failed")
                    + ("" if rec["ok"] else f"; PARITY FAILED: err {err:.3g} vs F.linear {err_torch:.3g}"))
            del sets, x, w, exact
            torch.cuda.empty_cache()
    return res


# ---------------------------------------------------------------------------------------------------- compile
class DecodeStep(torch.nn.Module):
    """A ZeroMerge-like layer: buffers mutated in place by the two ops, a position advanced in place."""

    def __init__(self, bsz, n_heads, n_kv, s_len, d, dtype, device, pos0):
        super().__init__()
        state = slot_inputs(bsz, n_kv, s_len, d, dtype, device, seed=7, dense=2)
        for name, t in zip(("k", "v", "w", "s", "dense_k", "dense_v"), state):
            self.register_buffer(name, t, persistent=False)
        self.register_buffer("pos", torch.tensor(pos0, device=device), persistent=False)
        self.register_buffer("base", torch.full((bsz,), s_len, device=device), persistent=False)
        self.s_len, self.dense, self.ring = s_len, 2, max(1, s_len // 10 - 1)

    def forward(self, q, k_new, v_new):
        out, s_new = decode_attention(q, self.k, self.v, None, self.pos, k_new, v_new, w=self.w,
                                      scores=self.s, logw_scale=LOGW_SCALE, decay=DECAY, backend="triton")
        slot_insert(self.k, self.v, self.w, self.s, k_new, v_new, s_new, self.pos, self.base, self.dense_k,
                    self.dense_v, dense=self.dense, ring=self.ring, backend="triton")
        self.pos.add_(1)
        return out


def check_compile(device, cpu: bool) -> dict[str, Any]:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    bsz, h, hkv, s_len, d = (2, 4, 2, 24, 64) if cpu else (2, 32, 8, 512, HEAD_DIM)
    dtype = torch.float32 if cpu else torch.bfloat16
    pos0 = [s_len - 3, s_len + 40]
    eager = DecodeStep(bsz, h, hkv, s_len, d, dtype, device, pos0)
    comp = DecodeStep(bsz, h, hkv, s_len, d, dtype, device, pos0)
    mode = {"backend": "eager"} if cpu else {"mode": "reduce-overhead"}
    step = torch.compile(comp, fullgraph=True, **mode)
    gen = torch.Generator(device=device).manual_seed(0)
    worst = 0.0
    n_steps = 8
    for _ in range(n_steps):
        q = torch.randn(bsz, h, d, generator=gen, device=device).to(dtype)
        kn = torch.randn(bsz, hkv, d, generator=gen, device=device).to(dtype)
        vn = torch.randn(bsz, hkv, d, generator=gen, device=device).to(dtype)
        want = eager(q, kn, vn)
        got = step(q, kn, vn).clone()
        worst = max(worst, (got.float() - want.float()).abs().max().item())
    bufs = {n: (dict(comp.named_buffers())[n].float() - b.float()).abs().max().item()
            for n, b in eager.named_buffers()}
    rec = {"mode": mode, "steps": n_steps, "max_abs_out": worst, "max_abs_buffers": bufs,
           "unique_graphs": counters["stats"]["unique_graphs"],
           "cudagraph_skips": counters["inductor"]["cudagraph_skips"] if not cpu else None}
    rec["ok"] = (worst <= 1e-2 and max(bufs.values()) <= 1e-2 and rec["unique_graphs"] == 1
                 and not rec["cudagraph_skips"])
    return rec


# ---------------------------------------------------------------------------------------------------- report
def row(r) -> str:
    t, ref = r.get("triton_s"), r.get("torch_s")
    s = f"{r['op']:<16} {r['model']:<4} {r.get('call', ''):<4} B={r['batch']:<2} S={r['slots']:<6} "
    s += f"triton {t * 1e6:9.1f} us " if t else "triton    failed "
    s += f"torch {ref * 1e6:9.1f} us " if ref else "torch         - "
    s += f"bytes {r['bytes'] / 1e6:9.2f} MB "
    if t:
        s += f"{r['gb_per_s']:7.0f} GB/s {r['frac_copy_bw']:6.1%} of copy"
    if r.get("tflop_per_s"):
        s += f" {r['tflop_per_s']:6.1f} TFLOP/s"
    return s


def probe_device(want_cpu: bool) -> torch.device | None:
    """The device a kernel probe runs on: CUDA, with fp32 references in full fp32 (no TF32), or the CPU under Triton's
    interpreter (``--cpu``, or no CUDA device), bf16 loads fixed there. None, with the reason printed, when the CPU
    is asked for but the interpreter was not set before triton loaded."""
    cpu = want_cpu or not torch.cuda.is_available()
    if cpu and os.environ.get("TRITON_INTERPRET") != "1":
        print("no CUDA device: rerun with --cpu (it sets TRITON_INTERPRET=1 before triton loads)")
        return None
    if cpu:
        fix_interpreter_bf16()
        return torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probes.ops", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for ops.json")
    p.add_argument("--cpu", action="store_true", help="no GPU: Triton's interpreter, tiny parity cases, no timing")
    p.add_argument("--no-sweep", action="store_true", help="skip the decode kernel's launch-settings sweep")
    p.add_argument("--budget-s", type=float, default=150.0, help="stop optional work (reference timings at the "
                   "largest sizes, the sweep) once the run has taken this long")
    ns = p.parse_args(argv)
    device = probe_device(ns.cpu)
    if device is None:
        return 2
    cpu = device.type == "cpu"
    ns.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"versions": environment(), "device": str(device), "failures": []}
    log(f"{report['versions']}")

    def section(name, fn):
        try:
            report[name] = fn()
        except Exception as e:
            report[name] = None
            report["failures"].append(f"{name}: {type(e).__name__}: {e}")
            traceback.print_exc()
            log(f"{name} FAILED: {type(e).__name__}: {e}")
        (ns.out / "ops.json").write_text(json.dumps(report, indent=1, default=str))

    section("parity", lambda: run_parity(device, cpu))
    for r in report["parity"] or []:
        if not r["ok"]:
            report["failures"].append(f"parity {r['op']} {r['case']}")
    section("compile", lambda: check_compile(device, cpu))
    if report["compile"] is not None:
        log(f"compile: {report['compile']}")
        if not report["compile"]["ok"]:
            report["failures"].append("compile check")
    if cpu:
        report["timing"] = "skipped: no GPU (the interpreter's speed means nothing)"
        log("timing skipped on CPU")
    else:
        section("bandwidth", lambda: copy_bandwidth(device))
        bw = (report["bandwidth"] or {}).get("bytes_per_s", 4.3e12)
        log(f"copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
        section("decode_attention", lambda: time_decode(device, bw, ns.budget_s))
        section("slot_insert", lambda: time_slot(device, bw))
        section("prefill_scores", lambda: time_prefill(device, bw))
        section("gemv", lambda: time_gemv(device, bw, ns.budget_s))
        for r in report.get("gemv") or []:
            if not r["ok"]:
                report["failures"].append(f"gemv parity {r['model']} rows={r['batch']}")
        if not ns.no_sweep:
            section("sweep", lambda: sweep_decode(device, bw, ns.budget_s))

    print("\n==== parity")
    for r in report["parity"] or []:
        detail = {k: v for k, v in r.items() if k not in ("op", "case", "ok", "dtype")}
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['op']:<16} {r['case']:<40} {r['dtype']:<15} {json.dumps(detail)}")
    if not cpu:
        print(f"\n==== timing (copy bandwidth {bw / 1e9:.0f} GB/s)")
        for key in ("decode_attention", "slot_insert", "prefill_scores", "gemv"):
            for r in report.get(key) or []:
                print(row(r))
        if report.get("sweep"):
            print("\n==== decode sweep: best setting per size (default first in SWEEP)")
            best: dict[tuple, dict] = {}
            for r in report["sweep"]:
                key = (r["model"], r["batch"], r["slots"], r["call"])
                if r.get("triton_s") and (key not in best or r["triton_s"] < best[key]["triton_s"]):
                    best[key] = r
            for key, r in best.items():
                default = next((x for x in report["sweep"] if (x["model"], x["batch"], x["slots"], x["call"]) == key
                                and (x["block_n"], x["num_warps"], x["num_stages"], x["programs_per_sm"])
                                == SWEEP[0]), None)
                dflt = f"{default['frac_copy_bw']:.0%}" if default and default.get("triton_s") else "-"
                print(f"{key}: best BLOCK_N={r['block_n']} warps={r['num_warps']} stages={r['num_stages']} "
                      f"programs/SM={r['programs_per_sm']}: {r['frac_copy_bw']:.0%} of copy (default {dflt})")
    (ns.out / "ops.json").write_text(json.dumps(report, indent=1, default=str))
    print(f"\nfailures: {report['failures'] or 'none'}\nwrote {ns.out / 'ops.json'}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())

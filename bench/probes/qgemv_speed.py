"""Speed of the int4 and int8 decode GEMV (``zmzoo.ops.qgemv``) at LLaMA-2-7B's decode products, batch 1, bf16 input.

    python -m bench.probes.qgemv_speed --out OUT          # one CUDA GPU (H200: about 2 minutes)
    python -m bench.probes.qgemv_speed --cpu --out OUT    # no GPU: Triton's interpreter, tiny shapes, parity only

For q|k|v (12288 x 4096), o (4096 x 4096), gate|up (22016 x 4096), down (4096 x 11008) and the LM head
(32000 x 4096), with int4 weights (``quantize_int4``: asymmetric, fp16 scale and zero) at group 64, then 32 and 128
while ``--budget-s`` allows:

Groups 32 and 128 time the new kernel only.

1. parity: the kernel at every setting of ``INT4_CANDIDATES`` (the int8 kernel at ``INT8_CANDIDATES``) against
   ``qgemv_ref`` (dequantize to bf16, then F.linear) and both against fp32 (the dequantized weight in fp32 times x in
   fp32); reported as max abs error over the output's max |y|. A setting fails when its error against fp32 exceeds
   twice the reference's plus 1e-4 (relative), or its difference from the reference exceeds 1e-2 (relative): printed
   as PARITY FAILED, exit 1.
2. timing: each call captured in a CUDA graph cycling through enough copies of the weight to exceed the L2
   (``zmzoo.ops._launch.time_graph``, as ``gemv.tune`` and ``bench.probes.ops`` time: median of graph replays over
   calls, warm-up and compile excluded) for: the new kernel at every candidate; the previous int4 kernel
   (``_old_int4_kernel`` below: a copy of the 4-bit branch ``zmzoo/ops/qgemv.py`` had before it was rewritten, kept
   here only for this comparison) at four of its settings; cuBLAS bf16 ``F.linear`` of the same shape; the int8
   per-channel kernel (``quantize_int8``) at every setting of ``INT8_CANDIDATES`` (its int32-word loop; the
   element-by-element loop it replaced was timed on 2026-12-02, docs/results/qgemv-speed-h200.json). Settings with a
   split (``Config.split``) include the second kernel that adds the ranges up.

First (alone with ``--a8-only``), every product with int8 activations (``product_a8``, ``zmzoo.ops.qgemv_a8``) and
its decode fusion: the two kernels a product ("triton-a8": the activations' quantization, then the integer products)
and the fused kernel ("triton-a8f", settings marked "f": one kernel that quantizes x itself) at every setting of
``a8_candidates``, beside the fp32-activation kernel; the summary gives the fastest of each.

GB/s counts the bytes each call must read (integers, scales, zeros or the bf16 matrix, and x; the output's writes
are not counted); the fractions are of 4.0 TB/s and of the measured copy bandwidth (read + write). Writes
OUT/qgemv_speed.json and prints one table row per (product, format, kernel, setting).
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

import zmzoo.ops.qgemv_a8 as A8
from bench.probes.ops import probe_device
from bench.timing import copy_bandwidth
from zmzoo.environment import environment
from zmzoo.ops._launch import launch, next_pow2, time_graph
from zmzoo.ops.gemv import Config, _epilogue, _input_tile
from zmzoo.ops.qgemv import INT4_CANDIDATES, INT8_CANDIDATES, qgemv, qgemv_ref
from zmzoo.ops.quant import QTensor, dequantize_ref, quantize_int4, quantize_int8

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

PRODUCTS = {"wqkv": (12288, 4096), "wo": (4096, 4096), "w13": (22016, 4096), "w2": (4096, 11008),
            "output": (32000, 4096)}
CPU_PRODUCTS = {"wqkv": (96, 256), "w2": (37, 384)}
GROUPS = (64, 32, 128)
# settings of the previous int4 kernel: the bf16 kernel's CANDIDATES the old int4 tuning picked most (one or two rows
# a program) and two wider ones
OLD_SETTINGS = (Config(2, 1024, 1, 2), Config(4, 1024, 4, 2), Config(8, 512, 2, 3), Config(16, 512, 4, 3))
INT8_SETTINGS = INT8_CANDIDATES
L2_FLUSH_BYTES = 256 * 2**20
REF_BW = 4.0e12
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[qgemv_speed {time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def _old_int4_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, g_ptr, r_ptr, y_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_rm, stride_ym, eps,
    GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_BIAS: tl.constexpr, NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The 4-bit branch of ``zmzoo.ops.qgemv._qgemv_kernel`` before the rewrite (git history, commit fa91b67),
    copied for comparison only: every element dequantized with its gathered scale and zero, then multiplied."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    mask_n = offs_n < N
    mask_m = offs_m < M
    rows = offs_n[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K // 2), dtype=tl.float32)
    sq = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # bytes of the tile
        mask_b = offs_b < K // 2
        col_lo = (offs_b // 16) * 32 + offs_b % 16  # the low nibble's column; the high one's is 16 further
        col_hi = col_lo + 16
        mask_w = mask_n[:, None] & mask_b[None, :]
        byte = tl.load(q_ptr + rows * stride_qn + offs_b[None, :], mask=mask_w, other=0).to(tl.int32)
        lo = (byte & 15).to(tl.float32)
        hi = (byte >> 4).to(tl.float32)
        s = tl.load(s_ptr + rows * stride_sn + (col_lo // GROUP)[None, :], mask=mask_w, other=0.0).to(tl.float32)
        if HAS_ZERO:  # w = scale * q + zero
            z = tl.load(z_ptr + rows * stride_sn + (col_lo // GROUP)[None, :], mask=mask_w,
                        other=0.0).to(tl.float32)
            w_lo = lo * s + z
            w_hi = hi * s + z
        else:  # w = scale * (q - 8)
            w_lo = (lo - 8.0) * s
            w_hi = (hi - 8.0) * s
        x_lo, x2_lo = _input_tile(x_ptr, g_ptr, offs_m, mask_m, stride_xm, col_lo, mask_b, K, SILU, NORM)
        x_hi, x2_hi = _input_tile(x_ptr, g_ptr, offs_m, mask_m, stride_xm, col_hi, mask_b, K, SILU, NORM)
        if NORM:
            sq += x2_lo + x2_hi
        acc += x_lo[:, None, :] * w_lo[None, :, :] + x_hi[:, None, :] * w_hi[None, :, :]
    y = tl.sum(acc, axis=2)
    _epilogue(y, tl.sum(sq, axis=1), offs_m, offs_n, mask_m, mask_n, s_ptr, 0, b_ptr, r_ptr, stride_rm, y_ptr,
              stride_ym, K, eps, False, NORM, HAS_BIAS, RESIDUAL)


def old_int4(x: torch.Tensor, w: QTensor, cfg: Config) -> torch.Tensor:
    """The previous kernel on a plain product (no norm, gate, bias or residual), BLOCK_K at least 64 as it needed."""
    m, n = x.shape[0], w.q.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    zero = w.zero if w.zero is not None else w.scale
    launch(_old_int4_kernel, (triton.cdiv(n, cfg.block_n),), x, w.q, w.scale, zero, w.scale, w.scale, y, y,
           m, n, w.shape[1], x.stride(0), w.q.stride(0), w.scale.stride(0), 0, y.stride(0), 1e-6,
           GROUP=w.group, HAS_ZERO=w.zero is not None, HAS_BIAS=False, NORM=False, SILU=False, RESIDUAL=False,
           BLOCK_M=next_pow2(m), BLOCK_N=cfg.block_n, BLOCK_K=max(64, cfg.block_k), num_warps=cfg.num_warps,
           num_stages=cfg.num_stages)
    return y


def n_copies(bytes_per_call: int, cpu: bool) -> int:
    return 1 if cpu else max(1, min(64, math.ceil(L2_FLUSH_BYTES / max(bytes_per_call, 1))))


def make_weights(n: int, k: int, copies: int, device, quantize, seed: int) -> list:
    """``copies`` random weights (rows of std 1 / sqrt(K), as a trained layer's), each drawn in bf16 and passed
    through ``quantize`` (None: kept bf16) one at a time."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for _ in range(copies):
        w = (torch.randn(n, k, device=device, generator=g) * k**-0.5).to(torch.bfloat16)
        out.append(w if quantize is None else quantize(w))
        del w
    return out


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.double() - want.double()).abs().max().item() / max(want.double().abs().max().item(), 1e-30)


def timer(cpu: bool):
    """``time_graph`` on CUDA; on the CPU one call's wall time (meaningless: only exercises the table)."""
    if not cpu:
        return time_graph

    def wall(calls):
        t = time.perf_counter()
        calls[0]()
        return time.perf_counter() - t

    return wall


def timed(fn_sets, cpu: bool) -> tuple[float | None, str | None]:
    try:
        return timer(cpu)(fn_sets), None
    except Exception as e:  # keep going: one failed setting must not lose the rest
        if not cpu:
            torch.cuda.synchronize()
        return None, f"{type(e).__name__}: {e}"


def row(rec: dict[str, Any], bw: float) -> dict[str, Any]:
    t = rec.get("seconds")
    if t:
        rec["us"] = t * 1e6
        rec["gb_per_s"] = rec["bytes"] / t / 1e9
        rec["frac_4tb"] = rec["bytes"] / t / REF_BW
        rec["frac_copy_bw"] = rec["bytes"] / t / bw
    return rec


def fmt(rec: dict[str, Any]) -> str:
    cfg = rec.get("setting") or ""
    head = f"{rec['product']:<7} {rec['n']:>5}x{rec['k']:<5} {rec['format']:<9} {rec['kernel']:<11} {cfg:<16}"
    if not rec.get("seconds"):
        return head + f" failed: {rec.get('error')}"
    extra = f"  err {rec['rel_err_fp32']:.2e} (ref {rec['ref_rel_err_fp32']:.2e})" if "rel_err_fp32" in rec else ""
    return (head + f" {rec['us']:8.2f} us {rec['gb_per_s']:7.0f} GB/s {rec['frac_4tb']:6.1%} of 4 TB/s "
            f"{rec['frac_copy_bw']:6.1%} of copy" + extra)


def setting(cfg: Config) -> str:
    return "n{}k{}w{}s{}".format(*cfg) + (f"x{cfg.split}" if cfg.split > 1 else "") + ("f" if cfg.fuse else "")


def product_int4(name: str, n: int, k: int, group: int, device, cpu: bool, bw: float, failures: list,
                 old: bool = True) -> list:
    """The new kernel at every candidate and (``old``) the previous one at OLD_SETTINGS, int4 per ``group`` with a
    zero."""
    out = []
    nbytes = n * k // 2 + 2 * 2 * n * (k // group) + 2 * k  # nibbles, fp16 scales and zeros, x
    ws = make_weights(n, k, n_copies(nbytes, cpu), device, lambda w: quantize_int4(w, group), seed=n + k + group)
    assert nbytes == ws[0].nbytes() + 2 * k
    g = torch.Generator(device=device).manual_seed(k)
    x = torch.randn(1, k, device=device, generator=g).to(torch.bfloat16)
    fp32 = x.float() @ dequantize_ref(ws[0], torch.float32).T
    ref = qgemv_ref(x, ws[0])
    ref_err = rel_err(ref, fp32)
    fmt_name = f"int4-g{group}"
    for kernel, settings in (("triton-new", INT4_CANDIDATES), ("triton-old", OLD_SETTINGS if old else ())):
        for cfg in settings:
            def call(w, c=cfg, kernel=kernel):
                if kernel == "triton-new":
                    return qgemv(x, w, backend="triton", config=c)
                return old_int4(x, w, c)

            rec = {"product": name, "n": n, "k": k, "format": fmt_name, "kernel": kernel, "setting": setting(cfg),
                   "bytes": nbytes, "ref_rel_err_fp32": ref_err}
            try:
                got = call(ws[0])
                rec["rel_err_fp32"] = rel_err(got, fp32)
                rec["rel_diff_ref"] = rel_err(got, ref)
                rec["ok"] = rec["rel_err_fp32"] <= 2 * ref_err + 1e-4 and rec["rel_diff_ref"] <= 1e-2
            except Exception as e:
                rec["ok"], rec["error"] = False, f"{type(e).__name__}: {e}"
            if not rec["ok"]:
                failures.append(f"{name} {fmt_name} {kernel} {setting(cfg)}")
                log(f"PARITY FAILED: {name} {fmt_name} {kernel} {setting(cfg)}: {rec}")
            rec["seconds"], err = timed([lambda w=w: call(w) for w in ws], cpu)
            if err:
                rec["error"] = err
            out.append(row(rec, bw))
            log(fmt(rec))
    del ws
    if not cpu:
        torch.cuda.empty_cache()
    return out


def product_baselines(name: str, n: int, k: int, device, cpu: bool, bw: float, failures: list) -> list:
    """cuBLAS bf16 F.linear and the int8 per-channel kernel at INT8_SETTINGS."""
    out = []
    g = torch.Generator(device=device).manual_seed(k + 1)
    x = torch.randn(1, k, device=device, generator=g).to(torch.bfloat16)
    dense = make_weights(n, k, n_copies(2 * n * k, cpu), device, None, seed=2 * n + k)
    rec = {"product": name, "n": n, "k": k, "format": "bf16", "kernel": "cublas", "setting": "F.linear",
           "bytes": 2 * n * k + 2 * k}
    rec["seconds"], err = timed([lambda w=w: F.linear(x, w) for w in dense], cpu)
    if err:
        rec["error"] = err
    out.append(row(rec, bw))
    log(fmt(rec))
    del dense
    nbytes = n * k + 4 * n + 2 * k
    ws = make_weights(n, k, n_copies(nbytes, cpu), device, quantize_int8, seed=3 * n + k)
    fp32 = x.float() @ dequantize_ref(ws[0], torch.float32).T
    ref_err = rel_err(qgemv_ref(x, ws[0]), fp32)
    for cfg in INT8_SETTINGS:
        rec = {"product": name, "n": n, "k": k, "format": "int8-row", "kernel": "triton-int8", "setting": setting(cfg),
               "bytes": nbytes, "ref_rel_err_fp32": ref_err}
        rec["rel_err_fp32"] = rel_err(qgemv(x, ws[0], backend="triton", config=cfg), fp32)
        rec["ok"] = rec["rel_err_fp32"] <= 2 * ref_err + 1e-4
        if not rec["ok"]:
            failures.append(f"{name} int8 {setting(cfg)}")
            log(f"PARITY FAILED: {name} int8 {setting(cfg)}: {rec}")
        rec["seconds"], err = timed([lambda w=w, c=cfg: qgemv(x, w, backend="triton", config=c) for w in ws], cpu)
        if err:
            rec["error"] = err
        out.append(row(rec, bw))
        log(fmt(rec))
    del ws
    if not cpu:
        torch.cuda.empty_cache()
    return out


# each product with the fusion the decode step gives it (zmzoo.models.transformer): the RMSNorm into q|k|v, gate|up
# and the LM head, the residual into o, the SiLU gate and the residual into down
DECODE_FUSION = {"wqkv": ("norm",), "wo": ("residual",), "w13": ("norm",), "w2": ("silu", "residual"),
                 "output": ("norm",)}


def product_a8(name: str, n: int, k: int, device, cpu: bool, bw: float, failures: list) -> list:
    """int8 activations (``zmzoo.ops.qgemv_a8``) against the fp32-activation kernel, both with the product's decode
    fusion (DECODE_FUSION), int4 g64 and int8 per channel, at every candidate of each. "triton-a8" (the unfused
    candidates) times the two kernels a product, the activation-quantization kernel included; "triton-a8f" (the
    fused ones, ``Config.fuse``) the one kernel that quantizes x itself, at the same settings; "a8-quant" and
    "a8-product" time the unfused two apart (at the fastest unfused setting). Parity: the kernel against
    ``qgemv_a8_ref`` (1e-2 of max |y|: bf16 output), a fused setting also against the unfused one at the same
    setting (``rel_diff_unfused``, the same bound: the same x^, the blocks' fp32 sums in another order), and the
    reference against exact activations within ``a8_error_bound`` (plus 1e-2 of max |y| for the bf16 rounding)."""
    out = []
    fusion = DECODE_FUSION.get(name, ())
    g = torch.Generator(device=device).manual_seed(k + 7)
    width = 2 * k if "silu" in fusion else k
    x = torch.randn(1, width, device=device, generator=g).to(torch.bfloat16)
    kw: dict[str, Any] = {}
    if "norm" in fusion:
        kw["norm"] = (1 + 0.1 * torch.randn(k, device=device, generator=g)).to(torch.bfloat16)
    if "silu" in fusion:
        kw["silu"] = True
    if "residual" in fusion:
        kw["residual"] = torch.randn(1, n, device=device, generator=g).to(torch.bfloat16)
    tag = "+".join(fusion) or "plain"
    for fmt_name, quantize, bits in (("int4-g64", lambda w: quantize_int4(w, 64), 4), ("int8-row", quantize_int8, 8)):
        probe_w = quantize(torch.zeros(8, k, device=device).to(torch.bfloat16))
        nbytes = n * probe_w.nbytes() // 8 + 2 * width
        ws = make_weights(n, k, n_copies(nbytes, cpu), device, quantize, seed=5 * n + k + bits)
        exact = qgemv_ref(x, ws[0], **kw).float()
        ref = A8.qgemv_a8_ref(x, ws[0], **kw).float()
        bound = A8.a8_error_bound(x, ws[0], norm=kw.get("norm"), silu=kw.get("silu", False))
        scale = max(exact.abs().max().item(), 1e-30)
        ref_ok = bool(((ref - exact).abs() <= bound + 1e-2 * scale).all())
        if not ref_ok:
            failures.append(f"{name} {fmt_name} a8 reference outside its error bound")
        best: tuple[float, Config] | None = None
        a8 = A8.a8_candidates(bits)
        unfused: dict[Config, torch.Tensor] = {}  # the unfused kernel's output at each setting (parity of fused)
        for kernel, settings in (("triton-a8", [c for c in a8 if not c.fuse]),
                                 ("triton-a8f", [c for c in a8 if c.fuse]), ("triton-fp32", candidates_for(bits))):
            for cfg in settings:
                def call(w, c=cfg, kernel=kernel):
                    if kernel in ("triton-a8", "triton-a8f"):
                        return A8.qgemv_a8(x, w, backend="triton", config=c, **kw)
                    return qgemv(x, w, backend="triton", config=c, **kw)

                rec = {"product": name, "n": n, "k": k, "format": f"{fmt_name}:{tag}", "kernel": kernel,
                       "setting": setting(cfg), "bytes": nbytes, "a8_bound_max": bound.max().item() / scale,
                       "a8_ref_err_exact": rel_err(ref, exact), "a8_ref_within_bound": ref_ok}
                try:
                    got = call(ws[0]).float()
                    rec["rel_err_exact"] = rel_err(got, exact)
                    rec["rel_diff_ref"] = rel_err(got, exact if kernel == "triton-fp32" else ref)
                    rec["ok"] = rec["rel_diff_ref"] <= 1e-2
                    if kernel == "triton-a8":
                        unfused[cfg] = got
                    twin = unfused.get(cfg._replace(fuse=0))
                    if kernel == "triton-a8f" and twin is not None:
                        rec["rel_diff_unfused"] = rel_err(got, twin)
                        rec["ok"] = rec["ok"] and rec["rel_diff_unfused"] <= 1e-2
                except Exception as e:
                    rec["ok"], rec["error"] = False, f"{type(e).__name__}: {e}"
                if not rec["ok"]:
                    failures.append(f"{name} {fmt_name} {kernel} {setting(cfg)}")
                    log(f"PARITY FAILED: {name} {fmt_name} {kernel} {setting(cfg)}: {rec}")
                rec["seconds"], err = timed([lambda w=w: call(w) for w in ws], cpu)
                if err:
                    rec["error"] = err
                if kernel == "triton-a8" and rec["seconds"] and (best is None or rec["seconds"] < best[0]):
                    best = (rec["seconds"], cfg)
                out.append(row(rec, bw))
                log(fmt(rec))
        if best is not None:  # the two kernels of the fastest unfused a8 setting, apart
            cfg = A8.a8_kernel_config(best[1])
            a = A8.quantize_act(x, kw.get("norm"), kw.get("silu", False))
            w0 = ws[0]
            res = kw.get("residual")
            for kernel, fn in (
                ("a8-quant", lambda: A8.quantize_act(x, kw.get("norm"), kw.get("silu", False))),
                ("a8-product", lambda: A8.qgemv_a8_launch(a, w0.q, w0.scale, w0.zero, None, "norm" in kw, res, 1e-6,
                                                          w0.group, w0.bits, *cfg[:5])),
            ):
                rec = {"product": name, "n": n, "k": k, "format": f"{fmt_name}:{tag}", "kernel": kernel,
                       "setting": setting(best[1]), "bytes": nbytes if kernel == "a8-product" else 2 * width}
                rec["seconds"], err = timed([fn], cpu)
                if err:
                    rec["error"] = err
                out.append(row(rec, bw))
                log(fmt(rec))
        del ws
        if not cpu:
            torch.cuda.empty_cache()
    return out


def candidates_for(bits: int) -> tuple:
    return INT4_CANDIDATES if bits == 4 else INT8_CANDIDATES


def summary(rows: list[dict[str, Any]]) -> list[str]:
    """Per product and format: the fastest setting of each kernel."""
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["product"], r["format"], r["kernel"])
        if r.get("seconds") and (key not in best or r["seconds"] < best[key]["seconds"]):
            best[key] = r
    lines = []
    for product in dict.fromkeys(r["product"] for r in rows):
        parts = [f"{f} {kern} {b['us']:.1f} us ({b['frac_4tb']:.0%}, {b['setting']})"
                 for (p, f, kern), b in best.items() if p == product]
        lines.append(f"{product}: " + "; ".join(parts))
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probes.qgemv_speed", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for qgemv_speed.json")
    p.add_argument("--cpu", action="store_true", help="no GPU: Triton's interpreter, tiny shapes, parity only")
    p.add_argument("--products", default=",".join(PRODUCTS), help="comma-separated subset of " + ",".join(PRODUCTS))
    p.add_argument("--no-old", action="store_true", help="leave out the previous int4 kernel")
    p.add_argument("--a8-only", action="store_true",
                   help="only the int8-activation comparison (product_a8), every product with its decode fusion")
    p.add_argument("--budget-s", type=float, default=150.0,
                   help="skip the groups after the first (64) once the run has taken this long")
    ns = p.parse_args(argv)
    device = probe_device(ns.cpu)
    if device is None:
        return 2
    cpu = device.type == "cpu"
    ns.out.mkdir(parents=True, exist_ok=True)
    shapes = CPU_PRODUCTS if cpu else {k: PRODUCTS[k] for k in ns.products.split(",")}
    report: dict[str, Any] = {"versions": environment(), "device": str(device), "cpu": cpu, "failures": [],
                              "rows": [], "ref_bandwidth": REF_BW}
    if not cpu:
        report["device_name"] = torch.cuda.get_device_name(device)
        report["bandwidth"] = copy_bandwidth(device)
    bw = report.get("bandwidth", {}).get("bytes_per_s", REF_BW)
    log(f"{report['versions']}; copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")

    def save():
        (ns.out / "qgemv_speed.json").write_text(json.dumps(report, indent=1, default=str))

    for name, (n, k) in shapes.items():
        try:
            report["rows"] += product_a8(name, n, k, device, cpu, bw, report["failures"])
        except Exception as e:
            traceback.print_exc()
            report["failures"].append(f"{name} a8: {type(e).__name__}: {e}")
        save()
    for group in () if ns.a8_only else GROUPS:
        if group != GROUPS[0] and time.perf_counter() - T0 > ns.budget_s:
            log(f"budget of {ns.budget_s:.0f} s reached: group {group} skipped")
            report.setdefault("skipped", []).append(f"int4-g{group}")
            continue
        for name, (n, k) in shapes.items():
            try:
                report["rows"] += product_int4(name, n, k, group, device, cpu, bw, report["failures"],
                                               old=group == GROUPS[0] and not ns.no_old)
                if group == GROUPS[0]:
                    report["rows"] += product_baselines(name, n, k, device, cpu, bw, report["failures"])
            except Exception as e:
                traceback.print_exc()
                report["failures"].append(f"{name} g{group}: {type(e).__name__}: {e}")
            save()
    report["summary"] = summary(report["rows"])
    save()
    print("\n==== fastest setting of each kernel (fraction of 4 TB/s)" + (" [CPU: times meaningless]" if cpu else ""))
    for line in report["summary"]:
        print(line)
    if report["failures"]:
        print(f"\nFAILED ({len(report['failures'])}): " + "; ".join(report["failures"]))
        return 1
    print(f"\nall parity checks passed; {ns.out / 'qgemv_speed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The quantized GEMV kernel compiled for a GPU offline (no GPU needed): instructions a weight element in its main
loop, registers, shared memory, barriers, spills, per launch setting. How ``INT4_CANDIDATES`` and ``INT8_CANDIDATES``
(``zmzoo/ops/qgemv.py``) were first narrowed down before the H200 timed them.

    python -m bench.probes.qgemv_sass                                   # both lists, plain and with the norm
    python -m bench.probes.qgemv_sass --bits 4 --settings 64,512,4,4 128,256,4,8 --fusion norm

Uses the ptxas / nvdisasm / cuobjdump that ship in Triton's wheel (also the CPU machines'), target sm_90 by default
(``--arch``). The integer arguments are given Triton's divisibility-by-16 specialisation where a real launch on
LLaMA-2-7B's shapes has it (K = 4096, row strides), so the loads vectorise as they do on the GPU. The loop is the
longest backward branch of the SASS; "instr/elem" divides its instructions by the weight elements a thread handles
per iteration (BLOCK_N * BLOCK_K / (32 * num_warps)). Figures depend on the Triton version: compare with the one the
GPU runs (docs/quantization.md used Triton 3.6).
"""

from __future__ import annotations

import argparse
import collections
import inspect
import math
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import zmzoo.ops.qgemv as Q
import zmzoo.ops.qgemv_a8 as A8

K = 4096  # LLaMA-2-7B's width: the products the lists were chosen for
DIVISIBLE = ("K", "stride_xm", "stride_qn", "stride_rm", "stride_ym")


def build(bits: int, group: int, block_n: int, block_k: int, warps: int, split: int = 1, norm: bool = False,
          silu: bool = False, residual: bool = False, xdtype: str = "bf16", arch: int = 90):
    """``_qgemv_kernel`` compiled for ``arch`` at one launch setting and fusion (batch 1, K = 4096, int4 with a zero;
    ``group`` 0 for 8 bits: one scale a row)."""
    kernel = triton.jit(Q._qgemv_kernel)
    names = list(inspect.signature(Q._qgemv_kernel).parameters)
    const = dict(BITS=bits, GROUP=group, HAS_ZERO=bits == 4, HAS_BIAS=False, NORM=norm, SILU=silu, RESIDUAL=residual,
                 BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k, SUB=math.gcd(K if group == 0 else group, block_k),
                 EVEN_K=True, WORDS=True, SPLIT=split)
    sig = {}
    for n in names:
        if n in const:
            sig[n] = "constexpr"
        elif n == "q_ptr":
            sig[n] = "*i32"
        elif n == "s_ptr":
            sig[n] = "*fp32" if group == 0 else "*fp16"
        elif n == "z_ptr":
            sig[n] = "*fp16"
        elif n in ("p_ptr", "sq_ptr"):
            sig[n] = "*fp32"
        elif n.endswith("_ptr"):
            sig[n] = f"*{xdtype}"
        elif n == "eps":
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    aligned = [n for n in names if n.endswith("_ptr") or n in DIVISIBLE] + (["stride_sn"] if group else [])
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(c),): v for c, v in const.items()},
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=1))


def build_a8(bits: int, group: int, block_n: int, block_k: int, warps: int, split: int = 1, norm: bool = False,
             silu: bool = False, residual: bool = False, xdtype: str = "bf16", arch: int = 90, fuse: int = 0):
    """``zmzoo.ops.qgemv_a8._qgemv_a8_kernel`` compiled as ``build`` compiles ``_qgemv_kernel`` (``fuse``: its FUSED
    variant, which quantizes x itself; unfused, ``silu`` has no effect: the gate is applied by the activations'
    quantization kernel)."""
    kernel = triton.jit(A8._qgemv_a8_kernel)
    names = list(inspect.signature(A8._qgemv_a8_kernel).parameters)
    const = dict(BITS=bits, GROUP=group, HAS_ZERO=bits == 4, HAS_BIAS=False, NORM=norm, SILU=silu and bool(fuse),
                 RESIDUAL=residual, BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=True, FULL=True, SPLIT=split,
                 FUSED=bool(fuse), ASM=True)
    types = dict(xq_ptr="*i32", q_ptr="*i32", xsq_ptr="*i32", dx_ptr="*fp32", xs_ptr="*fp32", sq_ptr="*fp32",
                 p_ptr="*fp32", psq_ptr="*fp32", s_ptr="*fp32" if group == 0 else "*fp16", z_ptr="*fp16")
    sig = {n: "constexpr" if n in const else types.get(n, f"*{xdtype}" if n.endswith("_ptr") else
                                                          "fp32" if n == "eps" else "i32") for n in names}
    aligned = [n for n in names if n.endswith("_ptr") or n in ("K", "stride_xm", "stride_qn", "stride_rm",
                                                                 "stride_ym")]
    aligned += ["stride_sn"] if group else []
    src = ASTSource(fn=kernel, signature=sig, constexprs={(names.index(c),): v for c, v in const.items()},
                    attrs={(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=1))


def loop_ops(compiled) -> collections.Counter:
    """Opcodes of the longest loop of the kernel's SASS."""
    from triton.tools.disasm import get_sass

    lines = get_sass(compiled.asm["cubin"]).splitlines()
    labels = {ln.strip()[:-1]: i for i, ln in enumerate(lines) if ln.strip().endswith(":")}
    best = None
    for i, ln in enumerate(lines):
        m = re.search(r"BRA (\w+);", ln)
        if m and labels.get(m.group(1), i) < i and (best is None or i - labels[m.group(1)] > best[1] - best[0]):
            best = (labels[m.group(1)], i)
    if best is None:
        return collections.Counter()
    body = [ln.split("\t", 1)[1].strip() for ln in lines[best[0] + 1 : best[1] + 1] if "\t" in ln]
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", b).split()[0].split(".")[0] for b in body)


def resources(compiled) -> dict[str, int]:
    """Registers, stack and shared memory a thread / program, from cuobjdump's resource usage."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED):(\d+)", out)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.probes.qgemv_sass", description=__doc__.split("\n")[0])
    p.add_argument("--bits", type=int, choices=(4, 8), nargs="*", default=[4, 8])
    p.add_argument("--settings", nargs="*",
                   help="BLOCK_N,BLOCK_K,num_warps[,split[,fuse]] (default: the candidate lists; fuse: --kernel a8)")
    p.add_argument("--fusion", nargs="*", default=["plain", "norm"], choices=("plain", "norm", "silu", "residual"))
    p.add_argument("--group", type=int, default=64, help="int4's group")
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--kernel", choices=("qgemv", "a8"), default="qgemv",
                   help="qgemv: zmzoo.ops.qgemv's kernel; a8: zmzoo.ops.qgemv_a8's (int8 activations)")
    ns = p.parse_args(argv)
    print(f"triton {triton.__version__}, sm_{ns.arch}, K = {K}, batch 1, bf16 input")
    print(f"{'bits':>4} {'setting':<24} {'fusion':<8} {'instr/elem':>10} {'regs':>5} {'stack':>5} {'BAR':>4} "
          f"{'LDL+STL':>7} {'MUFU':>5}")
    for bits in ns.bits:
        if ns.settings:
            cfgs = [Q.Config(*[int(v) for v in s.split(",")[:3]], 1, *[int(v) for v in s.split(",")[3:5]])
                    for s in ns.settings]
        else:
            cfgs = list(Q.candidates(bits) if ns.kernel == "qgemv" else A8.a8_candidates(bits))
        for cfg in cfgs:
            for fusion in ns.fusion:
                ck = (build if ns.kernel == "qgemv" else build_a8)(bits, ns.group if bits == 4 else 0, cfg.block_n,
                                                                   cfg.block_k, cfg.num_warps, cfg.split,
                           norm=fusion == "norm", silu=fusion == "silu", residual=fusion == "residual",
                           arch=ns.arch, **({"fuse": cfg.fuse} if ns.kernel == "a8" else {}))
                ops, res = loop_ops(ck), resources(ck)
                elems = cfg.block_n * cfg.block_k // (32 * cfg.num_warps)
                setting = f"({cfg.block_n}, {cfg.block_k}, {cfg.num_warps})" + (
                    f" x{cfg.split}" if cfg.split > 1 else "") + (" fused" if cfg.fuse else "")
                print(f"{bits:>4} {setting:<24} {fusion:<8} {sum(ops.values()) / elems:>10.2f} {res.get('reg', 0):>5} "
                      f"{res.get('stack', 0):>5} {ops['BAR']:>4} {ops['LDL'] + ops['STL']:>7} {ops['MUFU']:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

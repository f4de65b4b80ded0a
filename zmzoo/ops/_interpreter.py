"""Workarounds for Triton's CPU interpreter (``TRITON_INTERPRET=1``), used by the kernel tests and bench/ops.py."""

from __future__ import annotations


def fix_interpreter_bf16() -> None:
    """Make Triton's interpreter treat bfloat16 as the GPU does (both seen in triton 3.9):

    - ``tl.dot`` multiplied the raw uint16 bits of bf16 operands; widen them to fp32 first (exact, and what the bf16
      MMA does before its fp32 accumulation);
    - fp32 -> bf16 casts truncated; the GPU rounds to nearest even (cvt.rn.bf16.f32), and so does torch.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "_zmzoo_bf16", False):
        return
    orig_dot, orig_cast = builder.create_dot, builder.cast_impl

    def scalar(dtype):
        return getattr(dtype, "scalar", dtype)

    def widen(h):
        if scalar(h.dtype) == tl.bfloat16:
            return interpreter.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return h

    def create_dot(self, a, b, d, *args):
        return orig_dot(self, widen(a), widen(b), d, *args)

    def cast_impl(self, src, dst_type):
        if scalar(src.dtype) == tl.float32 and scalar(dst_type) == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)
            rounded = np.where(nan, np.uint16(0x7FC0), rounded).astype(np.uint16)
            return interpreter.TensorHandle(rounded.reshape(np.shape(src.data)), tl.bfloat16)
        return orig_cast(self, src, dst_type)

    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    builder._zmzoo_bf16 = True

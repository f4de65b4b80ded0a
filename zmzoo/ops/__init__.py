"""Ops: each file holds the public function, its plain-torch reference (``*_ref``) and the Triton kernel.

``backend`` selects the implementation: ``"torch"`` (the reference, runs anywhere, traced by torch.compile) or
``"triton"`` (the kernel; on CPU it needs ``TRITON_INTERPRET=1``). ``resolve_backend("auto", device)`` picks
Triton on CUDA and torch elsewhere.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def resolve_backend(ops: str, device: torch.device | str) -> str:
    if ops not in BACKENDS:
        raise ValueError(f"ops={ops!r} is not one of {', '.join(BACKENDS)}")
    device = torch.device(device)
    if ops == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if ops == "triton":
        if not triton_available():
            raise RuntimeError("ops='triton' needs the triton package, which is not importable here")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "ops='triton' on a CPU device runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1 "
                "in the environment before Python starts"
            )
    return ops


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True

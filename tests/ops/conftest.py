"""Kernel tests run the Triton kernels in Triton's interpreter on CPU.

TRITON_INTERPRET must be set before triton is first imported (its own library functions are decorated then), which
tests/conftest.py does for the whole run; it is repeated here for runs that load this directory's conftest first.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")


if os.environ.get("TRITON_INTERPRET") == "1":
    from zmzoo.ops._interpreter import fix_interpreter_bf16

    fix_interpreter_bf16()

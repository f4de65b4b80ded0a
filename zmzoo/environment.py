"""What a benchmark result was measured with: Python, torch, triton, transformers, zmzoo versions, CPU and GPU."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def environment() -> dict[str, Any]:
    """Versions and hardware, for the JSON that the bench/ programs write beside their figures."""
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "platform": platform.platform(), "cpu_count": os.cpu_count(),
                           "torch_threads": torch.get_num_threads()}
    for mod in ("triton", "transformers", "zmzoo"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # not installed, or broken: recorded as absent
            out[mod] = None
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
        out["gpu_memory_bytes"] = torch.cuda.get_device_properties(0).total_memory
    return out

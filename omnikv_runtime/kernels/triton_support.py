"""Whether Triton can be imported, and device facts the kernels' launch sizes follow."""

from __future__ import annotations

import functools
import importlib.util

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a fixed 8 elsewhere, e.g. the Triton interpreter)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count

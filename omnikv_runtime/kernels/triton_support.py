"""Whether Triton can be imported, device facts the kernels' launch sizes follow, and how kernels read
per-row device indices."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # kernels on CPU tensors: no libdevice there


@functools.cache
def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a fixed 8 elsewhere, e.g. the Triton interpreter)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def index_stride(first: torch.Tensor, second: torch.Tensor | None, batch: int) -> int:
    """How a kernel steps through per-row int64 device values (positions, lengths) from one batch
    row to the next: 1 when they hold one entry per row, 0 when a single entry serves every row."""
    counts = {first.numel()} | ({second.numel()} if second is not None else set())
    if len(counts) != 1 or not counts <= {1, batch}:
        raise ValueError(f"per-row values of {sorted(counts)} entries for {batch} batch rows")
    return 1 if batch > 1 and first.numel() == batch else 0

"""Moving KV between the host tier and the compute device.

``make_transfer_engine`` picks the implementation; everything else talks to the
:class:`TransferEngine` interface.
"""

from __future__ import annotations

import importlib.util

import torch

from omnikv_runtime.errors import ConfigError
from omnikv_runtime.transfer.base import TransferEngine, TransferStats
from omnikv_runtime.transfer.fp8 import storage_dtype
from omnikv_runtime.transfer.host_arena import HostArena
from omnikv_runtime.transfer.hot_cache import HotCache
from omnikv_runtime.transfer.pinning import pinned_bytes
from omnikv_runtime.transfer.torch_engine import TorchTransferEngine

__all__ = [
    "HostArena",
    "HotCache",
    "TorchTransferEngine",
    "TransferEngine",
    "TransferStats",
    "make_transfer_engine",
    "pinned_bytes",
]


def make_transfer_engine(
    compute_device: torch.device, offload_device: str, pin_memory: bool, kind: str = "auto", host_dtype: str = "auto"
) -> TransferEngine:
    """The transfer engine for a run.

    The host tier lives in CPU memory (``offload_device="cpu"``) or on the compute device
    (``"none"``). ``kind``: ``"triton"`` (CUDA: Triton gather on a side stream), ``"torch"``
    (anywhere), or ``"auto"`` (triton where CUDA and Triton are present, else torch).
    ``host_dtype``: ``"auto"`` (the model's dtype) or ``"float8_e4m3fn"`` (an FP8 host tier; with
    ``offload_device="cpu"`` only, where rows are fetched rather than read in place).

    The engine passes a loaded config's ``offload`` section, which has checked the values and that an FP8
    tier comes with ``offload.device = "cpu"``. Raw arguments (tests pass them) still fail plainly: an unknown
    ``host_dtype`` in :func:`~omnikv_runtime.transfer.fp8.storage_dtype`, an FP8 tier on the compute device
    in :class:`TransferEngine` (a tier attention reads in place cannot be FP8); both raise ValueError.
    """
    storage = storage_dtype(host_dtype)
    compute_device = torch.device(compute_device)
    host_device = torch.device("cpu") if offload_device == "cpu" else compute_device
    triton_ready = compute_device.type == "cuda" and importlib.util.find_spec("triton") is not None
    if kind == "triton" and not triton_ready:
        raise ConfigError(
            "offload.transfer", kind, "'auto' or 'torch' here: the Triton engine needs a CUDA device and triton"
        )
    if kind == "triton" or (kind == "auto" and triton_ready):
        from omnikv_runtime.transfer.triton_engine import TritonTransferEngine

        return TritonTransferEngine(compute_device, host_device, pin_memory, host_dtype=storage)
    fetches = offload_device == "cpu"
    return TorchTransferEngine(compute_device, host_device, pin_memory, fetches_rows=fetches, host_dtype=storage)

"""Moving KV between the host tier and the compute device.

``make_transfer_engine`` picks the implementation; everything else talks to the
:class:`TransferEngine` interface.
"""

from __future__ import annotations

import torch
from omnikv_runtime.transfer.base import TransferEngine, TransferStats
from omnikv_runtime.transfer.host_arena import HostArena
from omnikv_runtime.transfer.torch_engine import TorchTransferEngine

__all__ = ["HostArena", "TorchTransferEngine", "TransferEngine", "TransferStats", "make_transfer_engine"]


def make_transfer_engine(compute_device: torch.device, offload_device: str, pin_memory: bool) -> TransferEngine:
    """The transfer engine for a run: host tier in CPU memory (``"cpu"``) or on the compute device (``"none"``)."""
    host_device = torch.device("cpu") if offload_device == "cpu" else torch.device(compute_device)
    return TorchTransferEngine(torch.device(compute_device), host_device, pin_memory)

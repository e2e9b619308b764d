"""The portable transfer engine: torch indexing and copies, on any device.

On a machine without CUDA the host tier and the "GPU" tier are both CPU memory and this engine
moves rows between them; CI exercises the whole OmniKV logic through it.
"""

from __future__ import annotations

import logging

import torch

from omnikv_runtime.transfer.base import TransferEngine

logger = logging.getLogger(__name__)


class TorchTransferEngine(TransferEngine):
    """Gathers with ``index_select``-style indexing and ``copy_``; synchronous on CPU."""

    name = "torch"

    def allocate_host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        want_pinned = self.pin_memory and self.offloaded and torch.cuda.is_available()
        if want_pinned:
            try:
                return torch.empty(shape, dtype=dtype, device=self.host_device, pin_memory=True)
            except RuntimeError as exc:
                self.stats.pinned_fallbacks += 1
                logger.warning(
                    "pinned allocation of %.1f MB failed (%s); using pageable memory, transfers will be slower. "
                    "Raise the locked-memory limit (ulimit -l) or lower the context/batch to get pinned memory.",
                    torch.Size(shape).numel() * dtype.itemsize / 1e6,
                    exc,
                )
        return torch.empty(shape, dtype=dtype, device=self.host_device)

    def write_rows(self, arena: torch.Tensor, slot: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        count = keys.shape[2]
        target = arena[:, start : start + count, slot]  # [batch, n, 2, heads, dim]
        target[:, :, 0].copy_(keys.transpose(1, 2), non_blocking=True)
        target[:, :, 1].copy_(values.transpose(1, 2), non_blocking=True)
        self.stats.bytes_written += 2 * keys.numel() * keys.element_size()

    def read_rows(self, arena: torch.Tensor, slot: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = arena[:, :stop, slot].to(self.compute_device, non_blocking=True)
        if self.offloaded:
            self.stats.bytes_prefill_read += rows.numel() * rows.element_size()
        return rows[:, :, 0].transpose(1, 2), rows[:, :, 1].transpose(1, 2)

    def gather_rows(
        self, arena: torch.Tensor, indices: torch.Tensor, outputs: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        batch_index = torch.arange(arena.shape[0], device=arena.device)[:, None]
        rows = arena[batch_index, indices.to(arena.device)]  # [batch, k, layers, 2, heads, dim]
        rows = rows.to(self.compute_device, non_blocking=True)
        for slot, (keys_out, values_out) in enumerate(outputs):
            keys_out.copy_(rows[:, :, slot, 0].transpose(1, 2))
            values_out.copy_(rows[:, :, slot, 1].transpose(1, 2))
        self.stats.bytes_fetched += rows.numel() * rows.element_size()
        self.stats.gathers += 1

    def wait(self, arena: torch.Tensor, slot: int) -> None:
        """Nothing to wait for: every copy above is ordered on the current stream."""

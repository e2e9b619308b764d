"""The portable transfer engine: torch indexing and copies, on any device.

On a machine without CUDA the host tier and the "GPU" tier are both CPU memory and this engine
moves rows between them; CI exercises the whole OmniKV logic through it.
"""

from __future__ import annotations

import logging

import torch

from omnikv_runtime.transfer.base import TransferEngine
from omnikv_runtime.transfer.hot_cache import HotCache

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
                log = logger.warning if self.stats.pinned_fallbacks == 1 else logger.debug  # warn once
                log(
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

    def read_rows(self, arena: torch.Tensor, slot: int, stop: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rows = arena[:, start:stop, slot].to(self.compute_device, non_blocking=True)
        if self.offloaded:
            self.stats.bytes_prefill_read += rows.numel() * rows.element_size()
        return rows[:, :, 0].transpose(1, 2), rows[:, :, 1].transpose(1, 2)

    def gather_rows(
        self, arena: torch.Tensor, indices: torch.Tensor, staging: torch.Tensor, hot: HotCache | None = None
    ) -> None:
        batch_index = torch.arange(arena.shape[0], device=arena.device)[:, None]
        if hot is None:
            rows = arena[batch_index, indices.to(arena.device)]  # [batch, k, layers, 2, heads, dim]
            staging.copy_(rows, non_blocking=True)
            self.stats.bytes_fetched += rows.numel() * rows.element_size()
        else:
            staging.copy_(self._gather_through(hot, arena, indices, batch_index))
        self.stats.gathers += 1

    def write_row(self, arena: torch.Tensor, position: torch.Tensor, ring: torch.Tensor, slot: torch.Tensor) -> None:
        row = ring.index_select(1, slot)
        if arena.device != row.device:  # pageable host memory beside a GPU: the index must reach the host
            arena.index_copy_(1, position.to(arena.device), row.to(arena.device))
        else:
            arena.index_copy_(1, position, row)
        self.stats.bytes_written += row.numel() * row.element_size()

    def _gather_through(
        self, hot: HotCache, arena: torch.Tensor, indices: torch.Tensor, batch_index: torch.Tensor
    ) -> torch.Tensor:
        """Hot-cache semantics with plain indexing (this fallback reads every row; the counters
        and the Triton engine fetch only misses)."""
        host_rows, hot_slots = hot.plan(indices.to(hot.device), arena.shape[1])
        from_host = (host_rows >= 0).view(*host_rows.shape, *([1] * (arena.dim() - 2)))
        fetched = arena[batch_index, host_rows.clamp(min=0).to(arena.device)].to(self.compute_device)
        compute_batch = batch_index.to(self.compute_device)
        rows = torch.where(from_host, fetched, hot.data[compute_batch, hot_slots])
        hot.data[compute_batch, torch.where(host_rows >= 0, hot_slots, hot.slots)] = rows
        return rows

    def wait(self, arena: torch.Tensor, slot: int) -> None:
        """Nothing to wait for: every copy above is ordered on the current stream."""

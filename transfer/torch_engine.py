"""The portable transfer engine: torch indexing and copies, on any device.

On a machine without CUDA the host tier and the "GPU" tier are both CPU memory and this engine
moves rows between them; CI exercises the whole OmniKV logic through it, the FP8 host tier
included (quantized and dequantized by :mod:`omnikv_runtime.transfer.fp8` in torch, bit for bit
what the GPU kernels do).

Host allocations that should be pinned are mapped at their exact size and registered with CUDA
(:mod:`omnikv_runtime.transfer.pinning`); a registration that fails leaves pageable memory, with
one warning and the ``pinned_fallbacks`` counter.
"""

from __future__ import annotations

import logging

import torch

from omnikv_runtime.transfer import fp8
from omnikv_runtime.transfer.base import TransferEngine
from omnikv_runtime.transfer.hot_cache import HotCache
from omnikv_runtime.transfer.pinning import allocate_pinned, check_pinnable

logger = logging.getLogger(__name__)


def tier_bytes(values: int, element_size: int, head_dim: int, scales: torch.Tensor | None) -> int:
    """Host-tier bytes of ``values`` stored elements: codes plus one scale per ``head_dim`` when FP8."""
    if scales is None:
        return values * element_size
    return values + values // head_dim * scales.element_size()


def fetched_values(staging: torch.Tensor, indices: torch.Tensor, real_rows: int | None) -> int:
    """Staged elements a gather really fetched: every index's rows, or only ``real_rows`` of them when
    padding lanes (index -1) keep their staging rows."""
    per_index = staging.numel() // max(indices.numel(), 1)
    return per_index * (indices.numel() if real_rows is None else real_rows)


class TorchTransferEngine(TransferEngine):
    """Gathers with ``index_select``-style indexing and ``copy_``; synchronous on CPU."""

    name = "torch"

    def allocate_host(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        if not (self.pin_memory and self.offloaded and torch.cuda.is_available()):
            if self.host_device.type == "cpu":  # the same limit for pageable host memory
                check_pinnable(torch.Size(shape).numel() * dtype.itemsize)
            return torch.empty(shape, dtype=dtype, device=self.host_device)
        tensor, status = allocate_pinned(shape, dtype)
        if status != 0:
            self.stats.pinned_fallbacks += 1
            log = logger.warning if self.stats.pinned_fallbacks == 1 else logger.debug  # warn once
            log(
                "pinning %.1f MB of host memory failed (cudaHostRegister error %d); using pageable memory, "
                "transfers will be slower and decode steps will not be captured in a CUDA graph. "
                "Raise the locked-memory limit (ulimit -l) or lower the context/batch to get pinned memory.",
                tensor.numel() * tensor.element_size() / 1e6,
                status,
            )
        return tensor

    def write_rows(
        self,
        arena: torch.Tensor,
        slot: int,
        start: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        scales: torch.Tensor | None = None,
    ) -> None:
        count = keys.shape[2]
        target = arena[:, start : start + count, slot]  # [batch, n, 2, heads, dim]
        if scales is None:
            target[:, :, 0].copy_(keys.transpose(1, 2), non_blocking=True)
            target[:, :, 1].copy_(values.transpose(1, 2), non_blocking=True)
        else:
            for part, kv in enumerate((keys, values)):
                codes, group_scales = fp8.quantize(kv.transpose(1, 2))
                target[:, :, part].copy_(codes)
                scales[:, start : start + count, slot, part].copy_(group_scales)
        self.stats.bytes_written += tier_bytes(2 * keys.numel(), arena.element_size(), keys.shape[-1], scales)

    def read_rows(
        self,
        arena: torch.Tensor,
        slot: int,
        stop: int,
        start: int = 0,
        scales: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows = arena[:, start:stop, slot].to(self.compute_device, non_blocking=True)
        if self.offloaded:
            self.stats.bytes_prefill_read += tier_bytes(rows.numel(), rows.element_size(), rows.shape[-1], scales)
        if scales is not None:
            rows = fp8.dequantize(rows, scales[:, start:stop, slot].to(self.compute_device), dtype)
        return rows[:, :, 0].transpose(1, 2), rows[:, :, 1].transpose(1, 2)

    def gather_rows(
        self,
        arena: torch.Tensor,
        indices: torch.Tensor,
        staging: torch.Tensor,
        hot: HotCache | None = None,
        scales: torch.Tensor | None = None,
        real_rows: int | None = None,
    ) -> None:
        batch_index = torch.arange(arena.shape[0], device=arena.device)[:, None]
        if hot is None:
            host_indices = indices.to(arena.device)
            if real_rows is None:
                rows = self._fetch(arena, scales, batch_index, host_indices, staging.dtype)
                staging.copy_(rows, non_blocking=True)
            else:  # -1 lanes keep their staging rows
                wanted = (host_indices >= 0).to(staging.device)
                rows = self._fetch(arena, scales, batch_index, host_indices.clamp(min=0), staging.dtype)
                staging.copy_(torch.where(wanted.view(*wanted.shape, *[1] * (staging.dim() - 2)), rows, staging))
            fetched = fetched_values(staging, indices, real_rows)
            self.stats.bytes_fetched += tier_bytes(fetched, arena.element_size(), rows.shape[-1], scales)
        else:
            staging.copy_(self._gather_through(hot, arena, scales, indices, batch_index))
        self.stats.gathers += 1

    def _fetch(
        self,
        arena: torch.Tensor,
        scales: torch.Tensor | None,
        batch_index: torch.Tensor,
        indices: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``arena[b, indices[b, j]]`` on the compute device, dequantized to ``dtype`` when FP8."""
        rows = arena[batch_index, indices].to(self.compute_device)
        if scales is None:
            return rows
        return fp8.dequantize(rows, scales[batch_index, indices].to(self.compute_device), dtype)

    def write_row(
        self,
        arena: torch.Tensor,
        position: torch.Tensor,
        ring: torch.Tensor,
        slot: torch.Tensor,
        scales: torch.Tensor | None = None,
    ) -> None:
        row = ring[torch.arange(ring.shape[0], device=ring.device), slot]  # [batch, *row]: each row's own slot
        # pageable host memory beside a GPU: the indices must reach the host
        where = position.to(arena.device)
        batch_rows = torch.arange(arena.shape[0], device=arena.device)
        if scales is None:
            arena[batch_rows, where] = row.to(arena.device)
        else:
            codes, row_scales = fp8.quantize(row)
            arena.view(torch.uint8)[batch_rows, where] = codes.view(torch.uint8).to(arena.device)
            scales[batch_rows, where] = row_scales.to(arena.device)
        self.stats.bytes_written += tier_bytes(row.numel(), arena.element_size(), row.shape[-1], scales)

    def _gather_through(
        self,
        hot: HotCache,
        arena: torch.Tensor,
        scales: torch.Tensor | None,
        indices: torch.Tensor,
        batch_index: torch.Tensor,
    ) -> torch.Tensor:
        """Hot-cache semantics with plain indexing (this fallback reads every row; the counters
        and the Triton engine fetch only misses)."""
        host_rows, hot_slots = hot.plan(indices.to(hot.device), arena.shape[1])
        from_host = (host_rows >= 0).view(*host_rows.shape, *([1] * (arena.dim() - 2)))
        fetched = self._fetch(arena, scales, batch_index, host_rows.clamp(min=0).to(arena.device), hot.data.dtype)
        compute_batch = batch_index.to(self.compute_device)
        rows = torch.where(from_host, fetched, hot.data[compute_batch, hot_slots])
        hot.data[compute_batch, torch.where(host_rows >= 0, hot_slots, hot.slots)] = rows
        return rows

    def wait(self, arena: torch.Tensor, slot: int) -> None:
        """Nothing to wait for: every copy above is ordered on the current stream."""

"""The CUDA transfer engine: selected rows gathered on a side stream by the Triton UVA kernel.

A filter layer's indices stay on the GPU. The gather of every sparse layer of the segment is
queued on the transfer stream (after the compute stream's work so far), one launch per layer into
that layer's slice of the segment's staging buffer ``[batch, k, layers, 2, heads, dim]``, and
each layer records an event. A sparse layer makes the compute stream wait on its event (the first
sparse layer need not wait for the last one's rows); the host never synchronises, and the same
calls captured in a CUDA graph become fork/join edges of the graph.

Writes into a pinned host tier (prefill chunks and each decode step's new token) also run on the
transfer stream, by a small Triton kernel that stores straight into host memory, so a prefill
chunk's offload overlaps the next chunk's compute; the transfer stream orders them before any
later gather. A chunked prefill reads each sparse layer's earlier tokens back from the host tier
a block at a time: the next block's read (:meth:`prefetch_rows`; the next sparse layer's first
block while the current layer computes) overlaps compute instead of stalling it.

An FP8 host tier goes through the same kernels: the writes quantize on the GPU before the bytes
cross PCIe, the gather and the prefill reads dequantize on the GPU after, so only FP8 codes and
their scales cross the link and the GPU's buffers stay in the model's dtype.
"""

from __future__ import annotations

import torch

from omnikv_runtime.transfer.hot_cache import HotCache
from omnikv_runtime.transfer.torch_engine import TorchTransferEngine, fetched_values, tier_bytes
from omnikv_runtime.transfer.triton_gather import DEFAULT_PROGRAMS, copy_row, gather_rows, scatter_rows


class TritonTransferEngine(TorchTransferEngine):
    """Gathers with the persistent Triton kernel on its own CUDA stream; events per layer."""

    name = "triton"

    def __init__(
        self,
        compute_device: torch.device,
        host_device: torch.device,
        pin_memory: bool,
        num_programs: int = DEFAULT_PROGRAMS,
        fetches_rows: bool | None = None,
        host_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(compute_device, host_device, pin_memory, fetches_rows, host_dtype)
        if self.compute_device.type != "cuda":
            raise ValueError(f"the Triton transfer engine needs a CUDA compute device, got {self.compute_device}")
        self.num_programs = num_programs
        self.stream = torch.cuda.Stream(device=self.compute_device)
        self._events: dict[tuple[int, int], torch.cuda.Event] = {}
        # (arena, slot) -> ((start, stop), rows, event): a prefill's read of a block, started early
        self._ahead: dict[tuple[int, int], tuple[tuple[int, int], torch.Tensor, torch.cuda.Event]] = {}

    def write_rows(
        self,
        arena: torch.Tensor,
        slot: int,
        start: int,
        keys: torch.Tensor,
        values: torch.Tensor,
        scales: torch.Tensor | None = None,
    ) -> None:
        if not (arena.is_pinned() and keys.is_cuda):  # device arena, or pageable after a failed pin: plain copies
            super().write_rows(arena, slot, start, keys, values, scales)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.compute_device))  # the new KV is computed
        with torch.cuda.stream(self.stream):
            scatter_rows(arena, slot, start, keys, values, scales)
        keys.record_stream(self.stream)  # keep the KV alive until the write has run
        values.record_stream(self.stream)
        self.stats.bytes_written += tier_bytes(2 * keys.numel(), arena.element_size(), keys.shape[-1], scales)

    def graph_safe(self, arena: torch.Tensor) -> bool:
        """The GPU reads pinned host memory and device memory itself; pageable memory it cannot."""
        return arena.is_cuda or arena.is_pinned()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def read_rows(
        self,
        arena: torch.Tensor,
        slot: int,
        stop: int,
        start: int = 0,
        scales: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        compute = torch.cuda.current_stream(self.compute_device)
        ahead = self._ahead.pop((arena.data_ptr(), slot), None)
        if ahead is not None and ahead[0] == (start, stop):
            compute.wait_event(ahead[2])  # only this layer's read, not the writes queued after it
            rows = ahead[1]
        else:
            compute.wait_stream(self.stream)  # writes in flight land first
            if not arena.is_pinned():
                return super().read_rows(arena, slot, stop, start, scales, dtype)
            rows = self._read(arena, slot, start, stop, scales, dtype)
        return rows[:, :, 0].transpose(1, 2), rows[:, :, 1].transpose(1, 2)

    def prefetch_rows(
        self,
        arena: torch.Tensor,
        slot: int,
        stop: int,
        start: int = 0,
        scales: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Read a block of the layer's tokens on the transfer stream, after the writes queued there,
        while the compute stream works (a chunked prefill's next block, or the next sparse layer's first)."""
        if not arena.is_pinned() or stop <= start:
            return
        with torch.cuda.stream(self.stream):  # the buffer and indices belong to the transfer stream
            rows = self._read(arena, slot, start, stop, scales, dtype)
            event = torch.cuda.Event()
            event.record(self.stream)
        rows.record_stream(torch.cuda.current_stream(self.compute_device))  # read there: no reuse before that
        self._ahead[(arena.data_ptr(), slot)] = ((start, stop), rows, event)

    def discard_prefetches(self) -> None:
        self._ahead.clear()

    def _read(
        self,
        arena: torch.Tensor,
        slot: int,
        start: int,
        stop: int,
        scales: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        # one layer's slice of each token's packed row: strided in host memory, so the GPU reads it
        # itself (a copy engine would need it contiguous, which costs a host-side copy first)
        batch, count = arena.shape[0], stop - start
        tokens = torch.arange(start, stop, device=self.compute_device).expand(batch, count)
        out_dtype = arena.dtype if scales is None else dtype
        rows = torch.empty((batch, count, *arena.shape[3:]), dtype=out_dtype, device=self.compute_device)
        layer_scales = None if scales is None else scales[:, :, slot]
        gather_rows(arena[:, :, slot], tokens, rows, self.num_programs, scales=layer_scales)
        self.stats.bytes_prefill_read += tier_bytes(rows.numel(), arena.element_size(), rows.shape[-1], scales)
        return rows

    def gather_rows(
        self,
        arena: torch.Tensor,
        indices: torch.Tensor,
        staging: torch.Tensor,
        hot: HotCache | None = None,
        scales: torch.Tensor | None = None,
        real_rows: int | None = None,
    ) -> None:
        if arena.device.type == "cpu" and not arena.is_pinned():  # pageable (a pin failed): the GPU cannot read it
            super().gather_rows(arena, indices, staging, hot, scales, real_rows)
            return
        compute = torch.cuda.current_stream(self.compute_device)
        host_rows, hot_slots = indices, None
        if hot is not None:  # bookkeeping on the compute stream: small kernels, ordered with the selection
            host_rows, hot_slots = hot.plan(indices, arena.shape[1])
        self.stream.wait_stream(compute)  # indices are ready, and last step's readers of the buffers are done
        with torch.cuda.stream(self.stream):
            for slot in range(arena.shape[2]):  # one launch per layer: each sparse layer waits only for its rows
                gather_rows(
                    arena[:, :, slot],
                    host_rows,
                    staging[:, :, slot],
                    self.num_programs,
                    hot=hot.data[:, :, slot] if hot is not None else None,
                    hot_slots=hot_slots,
                    scales=scales[:, :, slot] if scales is not None else None,
                )
                self._events.setdefault((arena.data_ptr(), slot), torch.cuda.Event()).record(self.stream)
        if hot is None:
            fetched = fetched_values(staging, indices, real_rows)
            self.stats.bytes_fetched += tier_bytes(fetched, arena.element_size(), staging.shape[-1], scales)
        self.stats.gathers += 1

    def write_row(
        self,
        arena: torch.Tensor,
        position: torch.Tensor,
        ring: torch.Tensor,
        slot: torch.Tensor,
        scales: torch.Tensor | None = None,
    ) -> None:
        if arena.device.type == "cpu" and not arena.is_pinned():
            super().write_row(arena, position, ring, slot, scales)
            return
        copy_row(arena, position, ring, slot, scales)  # on the compute stream; later gathers wait for it
        self.stats.bytes_written += tier_bytes(ring[:, 0].numel(), arena.element_size(), ring.shape[-1], scales)

    def wait(self, arena: torch.Tensor, slot: int) -> None:
        event = self._events.get((arena.data_ptr(), slot))
        if event is not None:
            torch.cuda.current_stream(self.compute_device).wait_event(event)

"""The CUDA transfer engine: selected rows gathered on a side stream by the Triton UVA kernel.

A filter layer's indices stay on the GPU. The gather of every sparse layer of the segment is
queued on the transfer stream (after the compute stream's work so far), lands in a reused GPU
staging buffer ``[batch, k, layers, 2, heads, dim]``, is split into each layer's working buffer,
and each layer records an event. A sparse layer makes the compute stream wait on its event; the
host never synchronises.

Writes into a pinned host tier (prefill chunks and each decode step's new token) also run on the
transfer stream, by a small Triton kernel that stores straight into host memory, so a prefill
chunk's offload overlaps the next chunk's compute; the transfer stream orders them before any
later gather, and a full read of the host tier (chunked prefill) first waits for them.
"""

from __future__ import annotations

import torch

from omnikv_runtime.transfer.hot_cache import HotCache
from omnikv_runtime.transfer.torch_engine import TorchTransferEngine
from omnikv_runtime.transfer.triton_gather import DEFAULT_PROGRAMS, gather_rows, scatter_rows


class TritonTransferEngine(TorchTransferEngine):
    """Gathers with the persistent Triton kernel on its own CUDA stream; events per layer."""

    name = "triton"

    def __init__(
        self,
        compute_device: torch.device,
        host_device: torch.device,
        pin_memory: bool,
        num_programs: int = DEFAULT_PROGRAMS,
    ) -> None:
        super().__init__(compute_device, host_device, pin_memory)
        if self.compute_device.type != "cuda":
            raise ValueError(f"the Triton transfer engine needs a CUDA compute device, got {self.compute_device}")
        self.num_programs = num_programs
        self.stream = torch.cuda.Stream(device=self.compute_device)
        self._staging: torch.Tensor | None = None
        self._events: dict[tuple[int, int], torch.cuda.Event] = {}

    def _staging_for(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        needed = torch.Size(shape).numel()
        if self._staging is None or self._staging.numel() < needed or self._staging.dtype != dtype:
            with torch.cuda.stream(self.stream):
                self._staging = torch.empty(needed, dtype=dtype, device=self.compute_device)
        return self._staging[:needed].view(shape)

    def write_rows(self, arena: torch.Tensor, slot: int, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        if not (arena.is_pinned() and keys.is_cuda):  # device arena, or pageable after a failed pin: plain copies
            super().write_rows(arena, slot, start, keys, values)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.compute_device))  # the new KV is computed
        with torch.cuda.stream(self.stream):
            scatter_rows(arena, slot, start, keys, values)
        keys.record_stream(self.stream)  # keep the KV alive until the write has run
        values.record_stream(self.stream)
        self.stats.bytes_written += 2 * keys.numel() * keys.element_size()

    def synchronize(self) -> None:
        self.stream.synchronize()

    def read_rows(self, arena: torch.Tensor, slot: int, stop: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        torch.cuda.current_stream(self.compute_device).wait_stream(self.stream)  # writes in flight land first
        return super().read_rows(arena, slot, stop, start)

    def gather_rows(
        self,
        arena: torch.Tensor,
        indices: torch.Tensor,
        outputs: list[tuple[torch.Tensor, torch.Tensor]],
        hot: HotCache | None = None,
    ) -> None:
        if arena.device.type == "cpu" and not arena.is_pinned():  # pageable (a pin failed): the GPU cannot read it
            super().gather_rows(arena, indices, outputs, hot)
            return
        batch, k = indices.shape
        rows = self._staging_for((batch, k, *arena.shape[2:]), arena.dtype)
        compute = torch.cuda.current_stream(self.compute_device)
        indices = indices.to(self.compute_device)
        if hot is not None:  # bookkeeping on the compute stream: small kernels, ordered with the selection
            indices, hot_slots = hot.plan(indices, arena.shape[1])
        self.stream.wait_stream(compute)  # indices are ready, and last step's readers of the buffers are done
        with torch.cuda.stream(self.stream):
            if hot is None:
                gather_rows(arena, indices, rows, num_programs=self.num_programs)
                self.stats.bytes_fetched += rows.numel() * rows.element_size()
            else:
                gather_rows(arena, indices, rows, self.num_programs, hot=hot.data, hot_slots=hot_slots)
            self._split_rows(rows, outputs, after_layer=lambda slot: self._record_landed(arena, slot))
        indices.record_stream(self.stream)
        if hot is not None:
            hot_slots.record_stream(self.stream)
        self.stats.gathers += 1

    def _record_landed(self, arena: torch.Tensor, slot: int) -> None:
        event = torch.cuda.Event()
        event.record(self.stream)
        self._events[(arena.data_ptr(), slot)] = event

    def wait(self, arena: torch.Tensor, slot: int) -> None:
        event = self._events.get((arena.data_ptr(), slot))
        if event is not None:
            torch.cuda.current_stream(self.compute_device).wait_event(event)

"""One segment's state: a filter layer and the sparse layers that attend to its selection.

A segment owns everything its sparse layers need during decode, allocated once and then written
in place by each step:

- the **host arena**: the full KV of its sparse layers for every token, token-major with the
  layers packed per token (pinned host memory, or the GPU in GPU mode);
- the **tail ring**: the KV of the tokens generated since prefill, packed like the arena, on the
  GPU (see :mod:`omnikv_runtime.cache.counters`); each step's token is written into it and copied
  from it to the arena (write-back), one row per segment;
- the **selection**: the filter layer's chosen token indices ``[batch, k]`` and which of them are
  real tokens (padding, or columns past the selectable context, are masked in attention);
- the **staging** buffer ``[batch, k, layers, 2, kv_heads, head_dim]`` the selected rows are
  fetched into (offload mode; in GPU mode attention reads the arena through the indices, so no
  copy is made at all), with the **hot cache** of recently fetched rows when one is configured;
- the filter layer's **query window** and the selection policy's per-request **state**.
"""

from __future__ import annotations

from typing import Any

import torch

from omnikv_runtime.cache.counters import DecodeCounters, QueryWindow, write_columns
from omnikv_runtime.kernels import KVSource
from omnikv_runtime.layout import Segment
from omnikv_runtime.transfer import HostArena, HotCache, TransferEngine


class SegmentState:
    """The buffers and per-request state of one segment (see the module docstring)."""

    def __init__(self, segment: Segment, window_size: int) -> None:
        self.index = segment.index
        self.filter_layer = segment.filter_layer
        self.sparse_layers = segment.sparse_layers
        self.arena: HostArena | None = None
        self.hot: HotCache | None = None
        self.ring: torch.Tensor | None = None  # [batch, ring, layers, 2, kv_heads, head_dim]
        self.selection: torch.Tensor | None = None  # [batch, k] int64
        self.selection_valid: torch.Tensor | None = None  # [batch, k] bool
        self.staging: torch.Tensor | None = None  # [batch, k, layers, 2, kv_heads, head_dim] (offload)
        self.window = QueryWindow(window_size)
        self.policy_state: dict[str, Any] = {}

    # decode buffers (allocated outside any captured step) -----------------------------------
    def ensure_ring(self, batch: int, tokens: int, device: torch.device) -> None:
        """A zeroed tail ring of at least ``tokens`` slots; a grown ring keeps its first slots."""
        if self.arena is None:
            return
        if self.ring is not None and self.ring.shape[0] == batch and self.ring.shape[1] >= tokens:
            return
        ring = torch.zeros((batch, tokens, *self.arena.row_shape), dtype=self.arena.dtype, device=device)
        if self.ring is not None and self.ring.shape[0] == batch:
            ring[:, : self.ring.shape[1]].copy_(self.ring)
        self.ring = ring

    # one decode step ------------------------------------------------------------------------
    def store_token(self, slot: int, keys: torch.Tensor, values: torch.Tensor, counters: DecodeCounters) -> None:
        """Put sparse layer ``slot``'s new token ``[batch, kv_heads, 1, dim]`` into the tail ring."""
        write_columns(self.ring[:, :, slot, 0], 1, counters.tail_slot, keys.transpose(1, 2))
        write_columns(self.ring[:, :, slot, 1], 1, counters.tail_slot, values.transpose(1, 2))

    def write_back(self, transfer: TransferEngine, counters: DecodeCounters) -> None:
        """Copy the step's packed row (every sparse layer) from the ring to the arena at its column."""
        self.arena.write_row(counters.position, self.ring, counters.tail_slot)

    def set_selection(self, indices: torch.Tensor, selectable: torch.Tensor, transfer: TransferEngine) -> None:
        """Store the filter layer's choice ``[batch, k]`` and start fetching its rows (offload)."""
        if self.selection is None or self.selection.shape != indices.shape:
            self.selection = torch.empty_like(indices, dtype=torch.long)
            self.selection_valid = torch.empty(indices.shape, dtype=torch.bool, device=indices.device)
            self.staging = None
            if transfer.fetches_rows and self.arena is not None:
                shape = (*indices.shape, *self.arena.row_shape)
                self.staging = torch.zeros(shape, dtype=self.arena.dtype, device=indices.device)
        self.selection.copy_(indices)
        torch.gather(selectable, 1, self.selection, out=self.selection_valid)
        if self.staging is not None:
            self.arena.gather(self.selection, self.staging, self.hot)

    def sources(self, slot: int, counters: DecodeCounters) -> list[KVSource]:
        """What sparse layer ``slot`` attends to this step: its selected rows, then the tail ring."""
        if self.staging is not None:
            selected = KVSource(self.staging[:, :, slot, 0], self.staging[:, :, slot, 1], mask=self.selection_valid)
        else:  # the arena is on the compute device: read the selected rows where they are
            rows = self.arena.data
            selected = KVSource(
                rows[:, :, slot, 0], rows[:, :, slot, 1], index=self.selection, mask=self.selection_valid
            )
        tail = KVSource(self.ring[:, :, slot, 0], self.ring[:, :, slot, 1], length=counters.tail_count)
        return [selected, tail]

    # bookkeeping ------------------------------------------------------------------------------
    def gpu_bytes(self) -> dict[str, int]:
        """Bytes of the GPU-side buffers: selected rows (staging), tail ring, hot cache."""

        def size(tensor: torch.Tensor | None) -> int:
            return 0 if tensor is None else tensor.numel() * tensor.element_size()

        return {
            "selected": size(self.staging),
            "tail": size(self.ring),
            "hot": self.hot.nbytes() if self.hot is not None else 0,
        }

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, as beam search asks."""
        for name in ("ring", "selection", "selection_valid", "staging"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))
        for store in (self.arena, self.hot):
            if store is not None:
                store.select_batch(index)
        self.window.select_batch(index)

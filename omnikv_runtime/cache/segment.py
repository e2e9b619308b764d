"""One segment's state: a filter layer and the sparse layers that attend to its selection.

A segment owns everything its sparse layers need during decode, allocated once and then written
in place by each step:

- the **host arena**: the full KV of its sparse layers for every token, token-major with the
  layers packed per token (pinned host memory, or the GPU in GPU mode);
- the **tail ring**: the KV of the tokens generated since prefill, packed like the arena, on the
  GPU (see :mod:`omnikv_runtime.cache.counters`); each step's token is written into it and copied
  from it to the arena (write-back), one row per segment;
- the **selection**: the filter layer's chosen token indices ``[rows, k]`` and which of them are
  real tokens (padding, or columns past the selectable context, are masked in attention);
- the **staging** buffer ``[rows, k, layers, 2, kv_heads, head_dim]`` the selected rows are
  fetched into (offload mode; in GPU mode attention reads the arena through the indices, so no
  copy is made at all), with the **hot cache** of recently fetched rows when one is configured;
- the filter layer's **query window** and the selection policy's per-request **state**.

The selection, its mask and the staging rows are views of flat buffers that only grow: a step
recorded at one width and a step recorded at another read the same memory, so recorded steps of
several widths can be kept and replayed in any order.
"""

from __future__ import annotations

from typing import Any

import torch

from omnikv_runtime.cache.counters import DecodeCounters, QueryWindow
from omnikv_runtime.kernels import KVSource
from omnikv_runtime.kernels.column_write import write_columns
from omnikv_runtime.layout import Segment
from omnikv_runtime.transfer import HostArena, HotCache


def _tensor_bytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class SegmentState:
    """The buffers and per-request state of one segment (see the module docstring).

    Args:
        segment: the segment's layers.
        window_size: queries the selection policy reads (the query window's size).
        fetches_rows: whether selected rows are copied into staging (offload) or read in place.
    """

    def __init__(self, segment: Segment, window_size: int, fetches_rows: bool) -> None:
        self.index = segment.index
        self.filter_layer = segment.filter_layer
        self.sparse_layers = segment.sparse_layers
        self.fetches_rows = fetches_rows
        self.arena: HostArena | None = None
        self.hot: HotCache | None = None
        self.ring: torch.Tensor | None = None  # [rows, ring, layers, 2, kv_heads, head_dim]
        self.selection: torch.Tensor | None = None  # [rows, k] int64
        self.selection_valid: torch.Tensor | None = None  # [rows, k] bool
        self.staging: torch.Tensor | None = None  # [rows, k, layers, 2, kv_heads, head_dim] (offload)
        self.host_rows: torch.Tensor | None = None  # [rows, k] int64: the tokens read (-1: none) (offload)
        self._flat: dict[str, torch.Tensor] = {}  # what the four above are views of
        self.window = QueryWindow(window_size)
        self.policy_state: dict[str, Any] = {}

    # decode buffers (allocated outside any recorded step) -----------------------------------
    def ensure_ring(self, rows: int, tokens: int, device: torch.device) -> bool:
        """A zeroed tail ring of at least ``tokens`` slots; a grown ring keeps its first slots.
        Returns whether the ring was replaced."""
        if self.arena is None:
            return False
        if self.ring is not None and self.ring.shape[0] == rows and self.ring.shape[1] >= tokens:
            return False
        ring = torch.zeros((rows, tokens, *self.arena.row_shape), dtype=self.arena.dtype, device=device)
        if self.ring is not None and self.ring.shape[0] == rows:
            ring[:, : self.ring.shape[1]].copy_(self.ring)
        self.ring = ring
        return True

    def reserve_selection(self, rows: int, width: int, device: torch.device) -> bool:
        """Point the selection, its mask and the staging rows at ``[rows, width]`` views of the flat
        buffers, growing these when they are too small. Returns whether a buffer was replaced."""
        shapes = {"selection": ((rows, width), torch.long), "selection_valid": ((rows, width), torch.bool)}
        if self.fetches_rows and self.arena is not None:
            shapes["staging"] = ((rows, width, *self.arena.row_shape), self.arena.dtype)
            shapes["host_rows"] = ((rows, width), torch.long)  # the rows to read (-1: none; the hot cache's plan)
            if self.hot is not None:
                shapes["hot_slots"] = ((rows, width), torch.long)
        replaced = False
        views: dict[str, torch.Tensor] = {}
        for name, (shape, dtype) in shapes.items():
            flat = self._flat.get(name)
            needed = torch.Size(shape).numel()
            if flat is None or flat.numel() < needed or flat.dtype != dtype or flat.device != torch.device(device):
                flat = torch.zeros(needed, dtype=dtype, device=device)
                self._flat[name] = flat
                replaced = True
            views[name] = flat[:needed].view(shape)
        self.selection, self.selection_valid = views["selection"], views["selection_valid"]
        self.staging, self.host_rows = views.get("staging"), views.get("host_rows")
        if self.hot is not None and "hot_slots" in views:
            self.hot.use_outputs(views["host_rows"], views["hot_slots"])
        return replaced

    # one decode step ------------------------------------------------------------------------
    def store_token(self, slot: int, keys: torch.Tensor, values: torch.Tensor, counters: DecodeCounters) -> None:
        """Put sparse layer ``slot``'s new token ``[rows, kv_heads, 1, dim]`` into the tail ring."""
        ring = (self.ring[:, :, slot, 0], keys.transpose(1, 2)), (self.ring[:, :, slot, 1], values.transpose(1, 2))
        write_columns(1, counters.tail_slot, *ring)

    def write_back(self, counters: DecodeCounters) -> None:
        """Copy the step's packed row (every sparse layer) from the ring to the arena at its column."""
        self.arena.write_row(counters.position, self.ring, counters.tail_slot)

    def set_selection(
        self,
        indices: torch.Tensor,
        selectable: torch.Tensor,
        keep: torch.Tensor | None = None,
        kept: int | None = None,
    ) -> bool:
        """Store the filter layer's choice ``[rows, k]`` and start fetching its rows (offload).

        ``keep`` ``[rows, k]`` bool marks the real entries of a padded selection (the rest are masked in
        attention and fetch nothing: an idle slot's row, or the end of a shorter selection); ``kept`` is
        how many entries it marks (known where the padding was made). Returns whether a buffer was replaced.
        """
        replaced = self.reserve_selection(*indices.shape, indices.device)
        self.selection.copy_(indices)
        torch.gather(selectable, 1, self.selection, out=self.selection_valid)
        if keep is not None:
            self.selection_valid.logical_and_(keep)
        if self.staging is None:
            return replaced
        if self.hot is not None:
            self.hot.set_lanes(keep)
            self.arena.gather(self.selection, self.staging, self.hot)
        elif keep is None:
            self.arena.gather(self.selection, self.staging)
        else:
            self.host_rows.copy_(self.selection).masked_fill_(keep.logical_not(), -1)
            self.arena.gather(self.host_rows, self.staging, real_rows=kept)
        return replaced

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
    def forget(self) -> None:
        """Forget the request (its tokens, the policy's state, the query window); keep every buffer."""
        self.policy_state.clear()
        self.window.forget_prefill()
        if self.arena is not None:
            self.arena.forget()
        if self.hot is not None:
            self.hot.reset()

    def rows_view(self, start: int, stop: int) -> SegmentState:
        """The state of batch rows ``start..stop`` over the same arena, ring and hot cache memory; its
        selection buffers are its own (a step over these rows selects for these rows)."""
        view = SegmentState.__new__(SegmentState)
        view.__dict__.update(self.__dict__)
        view.arena = None if self.arena is None else self.arena.rows_view(start, stop)
        view.ring = None if self.ring is None else self.ring[start:stop]
        view.hot = None if self.hot is None else self.hot.rows_view(start, stop)
        view.selection = view.selection_valid = view.staging = view.host_rows = None
        view._flat = {}
        view.window = QueryWindow(self.window.size)
        view.policy_state = {}
        return view

    def gpu_bytes(self) -> dict[str, int]:
        """Bytes of the GPU-side buffers: selected rows (staging), tail ring, hot cache."""
        return {
            "selected": _tensor_bytes(self._flat.get("staging")),
            "tail": _tensor_bytes(self.ring),
            "hot": self.hot.nbytes() if self.hot is not None else 0,
        }

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, as beam search asks (eager steps only: buffers are replaced)."""
        for name in ("ring", "selection", "selection_valid", "staging"):
            tensor = getattr(self, name)
            if tensor is not None:
                tensor = tensor.index_select(0, index.to(tensor.device))
                setattr(self, name, tensor)
                if name != "ring":
                    self._flat[name] = tensor.view(-1)
        for store in (self.arena, self.hot):
            if store is not None:
                store.select_batch(index)
        self.window.select_batch(index)

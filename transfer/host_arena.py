"""The host tier of one segment: the full KV of its sparse layers for every token.

Layout ``[batch, capacity, layers, 2, kv_heads, head_dim]`` (token-major, the segment's sparse
layers packed per token), allocated through the transfer engine (pinned, at its exact size, where
it can) and grown only when a request outgrows the reserved capacity.

With an FP8 host tier (the engine's ``host_dtype`` float8_e4m3fn) ``data`` holds float8 codes and
``scales`` ``[batch, capacity, layers, 2, kv_heads]`` float32 beside them, both views of one
allocation (one pinned region). ``dtype`` stays the model's: what reads and gathers return.
"""

from __future__ import annotations

import torch

from omnikv_runtime.transfer import fp8
from omnikv_runtime.transfer.base import TransferEngine
from omnikv_runtime.transfer.hot_cache import HotCache

_SCALES_ALIGN = 64  # bytes: the scales start on their own cache line


def allocation_bytes(
    batch: int, capacity: int, layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, quantized: bool
) -> int:
    """Bytes one arena allocates (and pins): its values, or its FP8 codes then, aligned, their scales."""
    values = batch * capacity * layers * 2 * kv_heads * head_dim
    if not quantized:
        return values * dtype_bytes
    return -(-values // _SCALES_ALIGN) * _SCALES_ALIGN + values // head_dim * fp8.SCALE_DTYPE.itemsize


class HostArena:
    """Token-major store of one segment's sparse layers; every token ever seen stays here."""

    def __init__(
        self,
        engine: TransferEngine,
        batch: int,
        num_layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        capacity: int,
    ) -> None:
        self.engine = engine
        self.row_shape = (num_layers, 2, kv_heads, head_dim)
        self.dtype = dtype  # the model's: rows come back in it
        self.storage_dtype = engine.host_dtype or dtype
        self.quantized = fp8.is_quantized(self.storage_dtype)
        self.scales: torch.Tensor | None = None
        self.data, self.scales = self._allocate(batch, max(capacity, 1))
        self.lengths = [0] * num_layers
        self.view_of: HostArena | None = None  # a row view shares its parent's memory and cannot grow

    def rows_view(self, start: int, stop: int) -> HostArena:
        """An arena over batch rows ``start..stop`` of this one (same memory: writes land in this arena)."""
        view = object.__new__(HostArena)
        view.__dict__.update(self.__dict__)
        view.data = self.data[start:stop]
        view.scales = None if self.scales is None else self.scales[start:stop]
        view.lengths = [0] * len(self.lengths)
        view.view_of = self
        return view

    def _allocate(self, batch: int, capacity: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = (batch, capacity, *self.row_shape)
        if not self.quantized:
            return self.engine.allocate_host(shape, self.storage_dtype), None
        codes = torch.Size(shape).numel()
        offset = -(-codes // _SCALES_ALIGN) * _SCALES_ALIGN
        scale_shape = shape[:-1]
        block = self.engine.allocate_host((offset + torch.Size(scale_shape).numel() * 4,), torch.uint8)
        data = block[:codes].view(self.storage_dtype).view(shape)
        scales = block[offset:].view(fp8.SCALE_DTYPE).view(scale_shape)
        return data, scales

    def _raw(self, tensor: torch.Tensor) -> torch.Tensor:
        """FP8 codes as bytes (copies and indexing of any kind work on them), else the tensor itself."""
        return tensor.view(torch.uint8) if self.quantized else tensor

    @property
    def capacity(self) -> int:
        return self.data.shape[1]

    @property
    def row_bytes(self) -> int:
        """Host bytes of one token of one layer (keys and values; with their scales when FP8)."""
        _, _, heads, dim = self.row_shape
        return fp8.packed_row_bytes(1, heads, dim, self.dtype.itemsize, self.quantized)

    @property
    def fetch_row_bytes(self) -> int:
        """Host bytes of one packed token row (every layer): what fetching one selected token moves."""
        return self.row_shape[0] * self.row_bytes

    def nbytes(self) -> int:
        """Bytes allocated (codes and scales)."""
        scales = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.data.numel() * self.data.element_size() + scales

    def used_bytes(self) -> int:
        return self.data.shape[0] * sum(self.lengths) * self.row_bytes

    def ensure_capacity(self, tokens: int) -> None:
        """Grow (by at least doubling) so that ``tokens`` tokens fit."""
        if tokens <= self.capacity:
            return
        if self.view_of is not None:
            raise ValueError(f"{tokens} tokens do not fit this row's {self.capacity} columns (a row view cannot grow)")
        self.engine.synchronize()  # writes in flight must land before the host copies the old arena
        filled = max(self.lengths)
        data, scales = self._allocate(self.data.shape[0], max(tokens, 2 * self.capacity))
        self._raw(data[:, :filled]).copy_(self._raw(self.data[:, :filled]))
        if scales is not None:
            scales[:, :filled].copy_(self.scales[:, :filled])
        self.data, self.scales = data, scales

    def append(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Store new tokens of layer ``slot``; returns that layer's length afterwards."""
        start = self.lengths[slot]
        self.ensure_capacity(start + keys.shape[2])
        self.engine.write_rows(self.data, slot, start, keys, values, self.scales)
        self.lengths[slot] = start + keys.shape[2]
        return self.lengths[slot]

    def advance(self, steps: int) -> None:
        """Count ``steps`` more tokens in every layer (written by decode steps at device-side columns)."""
        self.lengths = [length + steps for length in self.lengths]

    def forget(self) -> None:
        """Count no token (the memory stays, for the next request)."""
        self.lengths = [0] * len(self.lengths)

    def read(self, slot: int, stop: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``start..stop`` of layer ``slot`` on the compute device (in the model's dtype)."""
        return self.engine.read_rows(self.data, slot, stop, start, self.scales, self.dtype)

    def prefetch(self, slot: int, stop: int, start: int = 0) -> None:
        """Start reading tokens ``start..stop`` of layer ``slot`` ahead of a :meth:`read` of exactly those
        tokens (if reads are asynchronous)."""
        self.engine.prefetch_rows(self.data, slot, stop, start, self.scales, self.dtype)

    def gather(
        self,
        indices: torch.Tensor,
        staging: torch.Tensor,
        hot: HotCache | None = None,
        real_rows: int | None = None,
    ) -> None:
        """Fetch tokens ``indices`` ``[batch, k]`` of every layer into the packed ``staging`` rows (through ``hot``;
        without it, -1 lanes fetch nothing and ``real_rows`` counts the others: see the engine's ``gather_rows``)."""
        self.engine.gather_rows(self.data, indices, staging, hot, self.scales, real_rows)

    def write_row(self, position: torch.Tensor, ring: torch.Tensor, slot: torch.Tensor) -> None:
        """Decode write-back: ``self[b, position[b]] = ring[b, slot[b]]`` (packed rows, device-side indices)."""
        self.engine.write_row(self.data, position, ring, slot, self.scales)

    def wait(self, slot: int) -> None:
        """Order the compute stream after the last gather of layer ``slot`` (no host synchronisation)."""
        self.engine.wait(self.data, slot)

    def select_batch(self, batch_index: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, as beam search asks."""
        self.engine.synchronize()
        index = batch_index.to(self.data.device)
        if not self.quantized:
            self.data = self.data.index_select(0, index)
            return
        data, scales = self._allocate(index.numel(), self.capacity)
        self._raw(data).copy_(self._raw(self.data).index_select(0, index))
        scales.copy_(self.scales.index_select(0, index))
        self.data, self.scales = data, scales

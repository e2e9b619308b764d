"""The host tier of one segment: the full KV of its sparse layers for every token.

Layout ``[batch, capacity, layers, 2, kv_heads, head_dim]`` (token-major, the segment's sparse
layers packed per token), allocated through the transfer engine (pinned where it can) and grown
only when a request outgrows the reserved capacity.
"""

from __future__ import annotations

import torch

from omnikv_runtime.transfer.base import TransferEngine
from omnikv_runtime.transfer.hot_cache import HotCache


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
        self.dtype = dtype
        self.data = engine.allocate_host((batch, max(capacity, 1), *self.row_shape), dtype)
        self.lengths = [0] * num_layers

    @property
    def capacity(self) -> int:
        return self.data.shape[1]

    @property
    def row_bytes(self) -> int:
        """Bytes of one token of one layer (keys and values)."""
        _, _, heads, dim = self.row_shape
        return 2 * heads * dim * self.dtype.itemsize

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def used_bytes(self) -> int:
        return self.data.shape[0] * sum(self.lengths) * self.row_bytes

    def ensure_capacity(self, tokens: int) -> None:
        """Grow (by at least doubling) so that ``tokens`` tokens fit."""
        if tokens <= self.capacity:
            return
        self.engine.synchronize()  # writes in flight must land before the host copies the old arena
        grown = self.engine.allocate_host(
            (self.data.shape[0], max(tokens, 2 * self.capacity), *self.row_shape), self.dtype
        )
        filled = max(self.lengths)
        grown[:, :filled].copy_(self.data[:, :filled])
        self.data = grown

    def append(self, slot: int, keys: torch.Tensor, values: torch.Tensor) -> int:
        """Store new tokens of layer ``slot``; returns that layer's length afterwards."""
        start = self.lengths[slot]
        self.ensure_capacity(start + keys.shape[2])
        self.engine.write_rows(self.data, slot, start, keys, values)
        self.lengths[slot] = start + keys.shape[2]
        return self.lengths[slot]

    def read(self, slot: int, stop: int, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``start..stop`` of layer ``slot`` on the compute device."""
        return self.engine.read_rows(self.data, slot, stop, start)

    def prefetch(self, slot: int, stop: int) -> None:
        """Start reading tokens ``0..stop`` of layer ``slot`` ahead of :meth:`read` (if reads are asynchronous)."""
        self.engine.prefetch_rows(self.data, slot, stop)

    def gather(self, indices: torch.Tensor, staging: torch.Tensor, hot: HotCache | None = None) -> None:
        """Fetch tokens ``indices`` ``[batch, k]`` of every layer into the packed ``staging`` rows (through ``hot``)."""
        self.engine.gather_rows(self.data, indices, staging, hot)

    def wait(self, slot: int) -> None:
        """Order the compute stream after the last gather of layer ``slot`` (no host synchronisation)."""
        self.engine.wait(self.data, slot)

    def select_batch(self, batch_index: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, as beam search asks."""
        self.engine.synchronize()
        self.data = self.data.index_select(0, batch_index.to(self.data.device))

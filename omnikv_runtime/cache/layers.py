"""Per-layer KV storage of the tiered cache: dense layers and sparse layers.

Both are transformers ``CacheLayerMixin`` subclasses, so the rest of transformers (masks,
``get_seq_length``, generation) sees an ordinary cache. A dense layer's buffer has a fixed
capacity (the reserve: prompt + new tokens), grown by doubling only when a request outgrows it;
prefill appends at the host-side length, a decode step writes at a device-side position, so a
captured step replays at every position. A sparse layer's KV lives in its segment's host arena
(see :mod:`omnikv_runtime.cache.segment`); its prefill ``update`` returns the chunk alone and
describes the earlier tokens (:attr:`earlier`) for the attention function to read in blocks.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from omnikv_runtime.cache.counters import DecodeCounters
from omnikv_runtime.cache.prefill_blocks import EarlierKV
from omnikv_runtime.cache.segment import SegmentState
from omnikv_runtime.kernels import KVSource
from omnikv_runtime.kernels.column_write import write_columns
from omnikv_runtime.transfer import HostArena


class _KVLayerBase(CacheLayerMixin):
    """What both layer kinds share: the token count and transformers' bookkeeping methods."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.length = 0  # tokens stored for this layer, all tiers together (host-side count)
        # a prefill chunk's earlier tokens that its attention reads from another tier (a sparse layer's
        # host arena); None: ``update`` returned every token the chunk attends to
        self.earlier: EarlierKV | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.length

    def advance(self, steps: int) -> None:
        """Count ``steps`` more tokens, stored by decode steps (whose writes go to device-side columns)."""
        self.length += steps

    def forget(self) -> None:
        """Hold no token (the buffers stay, for the next request)."""
        self.length = 0
        self.earlier = None

    def get_mask_sizes(self, query_length: int, *args, **kwargs) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # transformers < 5.10 name of get_max_length
        return -1

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "OmniKVCache cannot be cropped (assisted or contrastive decoding); use greedy, sampling or beam search"
        )

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("OmniKVCache cannot repeat its batch; expand the inputs before prefill instead")


class DenseLayerKV(_KVLayerBase):
    """Full KV on the compute device (layers before the first filter layer, filter and wait layers).

    ``key_buffer``/``value_buffer`` are ``[batch, kv_heads, capacity, head_dim]``; the first
    ``length`` columns hold the tokens.
    """

    def __init__(self, reserve: int = 0) -> None:
        super().__init__()
        self.reserve = reserve
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    @property
    def capacity(self) -> int:
        return 0 if self.key_buffer is None else self.key_buffer.shape[2]

    def ensure_capacity(self, like: torch.Tensor, needed: int) -> None:
        """Room for ``needed`` tokens (at least doubling), keeping what is stored; new room is zeroed."""
        if self.key_buffer is not None and self.capacity >= needed and self.key_buffer.shape[0] == like.shape[0]:
            return
        capacity = max(needed, self.reserve, 2 * self.capacity, 16)
        batch, heads, _, dim = like.shape
        keys = torch.zeros(batch, heads, capacity, dim, dtype=like.dtype, device=like.device)
        values = torch.zeros_like(keys)
        if self.key_buffer is not None and self.length:
            keys[:, :, : self.length].copy_(self.key_buffer[:, :, : self.length])
            values[:, :, : self.length].copy_(self.value_buffer[:, :, : self.length])
        self.key_buffer, self.value_buffer = keys, values
        self.refresh_views()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Prefill: append at the host-side length and return every stored token."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[2]
        self.ensure_capacity(key_states, self.length + count)
        self.key_buffer[:, :, self.length : self.length + count].copy_(key_states)
        self.value_buffer[:, :, self.length : self.length + count].copy_(value_states)
        self.length += count
        self.refresh_views()
        return self.keys, self.values

    def advance(self, steps: int) -> None:
        super().advance(steps)
        self.refresh_views()

    def forget(self) -> None:
        super().forget()
        self.refresh_views()

    def refresh_views(self) -> None:
        """Point ``keys``/``values`` at the stored tokens (after the host-side length moved)."""
        if self.key_buffer is not None:
            self.keys = self.key_buffer[:, :, : self.length]
            self.values = self.value_buffer[:, :, : self.length]

    def write_at(self, key_states: torch.Tensor, value_states: torch.Tensor, position: torch.Tensor) -> None:
        """Decode: store one token per row at column ``position[b]`` (int64 ``[batch]`` on the device)."""
        write_columns(2, position, (self.key_buffer, key_states), (self.value_buffer, value_states))

    def decode(
        self, key_states: torch.Tensor, value_states: torch.Tensor, counters: DecodeCounters, valid: torch.Tensor
    ) -> list[KVSource]:
        """A decode step: store the token at each row's position; attention reads the buffer up to each
        row's length, real columns only (``valid``)."""
        self.write_at(key_states, value_states, counters.position)
        keys, values = self.key_buffer.transpose(1, 2), self.value_buffer.transpose(1, 2)
        return [KVSource(keys, values, length=counters.length, mask=valid)]

    def nbytes(self) -> int:
        buffers = (self.key_buffer, self.value_buffer)
        return sum(b.numel() * b.element_size() for b in buffers if b is not None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.key_buffer is not None:
            index = beam_idx.to(self.key_buffer.device)
            self.key_buffer = self.key_buffer.index_select(0, index)
            self.value_buffer = self.value_buffer.index_select(0, index)
            self.refresh_views()

    batch_select_indices = reorder_cache


class SparseLayerKV(_KVLayerBase):
    """A sparse layer: its full KV in its segment's host arena (row slot ``slot``). During decode
    the segment serves its selected rows and its tail ring (:class:`omnikv_runtime.cache.segment.SegmentState`)."""

    def __init__(self, segment: SegmentState, slot: int, read_block_tokens: int) -> None:
        super().__init__()
        self.state = segment  # the segment this layer belongs to (its arena, ring and selection)
        self.segment = segment.index
        self.slot = slot  # this layer's position inside its segment's arena rows
        self.read_block_tokens = read_block_tokens  # earlier tokens a prefill chunk reads back at a time

    @property
    def arena(self) -> HostArena | None:
        return self.state.arena

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Prefill: store the chunk in the arena and return the chunk alone. Its earlier tokens stay in
        the arena: :attr:`earlier` says where, and the attention function reads them back a block at a
        time (:func:`~omnikv_runtime.cache.prefill_blocks.attend_over_blocks`), so nothing here grows
        with the context. The chunk's attention uses its own KV as computed (it need not wait for its
        write to land)."""
        past = self.length
        self.store(key_states, value_states)
        self.earlier = EarlierKV(self.arena, self.slot, past, self.read_block_tokens) if past else None
        return key_states, value_states

    def store(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append tokens to the arena without returning anything (prefill, or a cache filled directly)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.length = self.arena.append(self.slot, key_states, value_states)

    def decode(
        self, key_states: torch.Tensor, value_states: torch.Tensor, counters: DecodeCounters, valid: torch.Tensor
    ) -> list[KVSource]:
        """A decode step: the token goes to the tail ring (the segment's last layer writes the packed
        row back to the arena); attention reads the selected rows (once they have landed) and the tail."""
        state = self.state
        state.store_token(self.slot, key_states, value_states, counters)
        if self.slot == len(state.sparse_layers) - 1:
            state.write_back(counters)
        if state.staging is not None:
            state.arena.wait(self.slot)  # the compute stream waits for its rows, the host does not
        return state.sources(self.slot, counters)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """The arena and the segment's buffers are reordered by the cache."""

    batch_select_indices = reorder_cache

"""Per-layer KV storage of the tiered cache: dense layers and sparse layers.

Both are transformers ``CacheLayerMixin`` subclasses, so the rest of transformers (masks,
``get_seq_length``, generation) sees an ordinary cache. Buffers grow by doubling from a reserved
capacity, and return views: no per-step concatenation of the whole history.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import CacheLayerMixin

from omnikv_runtime.transfer import HostArena


def _grow(buffer: torch.Tensor | None, like: torch.Tensor, length: int, needed: int) -> torch.Tensor:
    """A ``[batch, heads, capacity, dim]`` buffer that holds ``needed`` tokens, keeping the first ``length``."""
    if buffer is not None and buffer.shape[2] >= needed:
        return buffer
    capacity = max(needed, 2 * (buffer.shape[2] if buffer is not None else 0), 16)
    batch, heads, _, dim = like.shape
    grown = torch.empty(batch, heads, capacity, dim, dtype=like.dtype, device=like.device)
    if buffer is not None and length:
        grown[:, :, :length].copy_(buffer[:, :, :length])
    return grown


def _select_batch(buffer: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
    """``buffer`` with its batch rows picked (and reordered) by ``index``; None stays None."""
    return None if buffer is None else buffer.index_select(0, index.to(buffer.device))


class _KVLayerBase(CacheLayerMixin):
    """What both layer kinds share: the token count and transformers' bookkeeping methods."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.length = 0  # tokens stored for this layer, all tiers together

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
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
    """Full KV on the compute device (layers before the first filter layer, filter and wait layers)."""

    def __init__(self, reserve: int = 0) -> None:
        super().__init__()
        self.reserve = reserve
        self._keys_buffer: torch.Tensor | None = None
        self._values_buffer: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        count = key_states.shape[2]
        needed = max(self.length + count, self.reserve)
        self._keys_buffer = _grow(self._keys_buffer, key_states, self.length, needed)
        self._values_buffer = _grow(self._values_buffer, value_states, self.length, needed)
        self._keys_buffer[:, :, self.length : self.length + count].copy_(key_states)
        self._values_buffer[:, :, self.length : self.length + count].copy_(value_states)
        self.length += count
        self.keys = self._keys_buffer[:, :, : self.length]
        self.values = self._values_buffer[:, :, : self.length]
        return self.keys, self.values

    def nbytes(self) -> int:
        buffers = (self._keys_buffer, self._values_buffer)
        return sum(b.numel() * b.element_size() for b in buffers if b is not None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self._keys_buffer is not None:
            self._keys_buffer = _select_batch(self._keys_buffer, beam_idx)
            self._values_buffer = _select_batch(self._values_buffer, beam_idx)
            self.keys = self._keys_buffer[:, :, : self.length]
            self.values = self._values_buffer[:, :, : self.length]

    batch_select_indices = reorder_cache


class SparseLayerKV(_KVLayerBase):
    """A sparse layer: full KV in its segment's host arena; on the compute device, a working buffer
    holding the selected rows ``[0, selected)`` followed by the tail (tokens since prefill).
    """

    def __init__(self, slot: int) -> None:
        super().__init__()
        self.slot = slot  # this layer's position inside its segment's arena rows
        self.arena: HostArena | None = None
        self.selected = 0  # selected context rows at the front of the working buffer
        self.tail = 0  # tokens appended since the last prefill, after the selected rows
        self._work_keys: torch.Tensor | None = None
        self._work_values: torch.Tensor | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Prefill-style update: store in the arena and return the full KV (used when q > 1)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        past = self.length
        self.length = self.arena.append(self.slot, key_states, value_states)
        self.selected = self.tail = 0
        if past == 0:
            return key_states, value_states
        return self.arena.read(self.slot, self.length)

    def update_decode(self, key_states: torch.Tensor, value_states: torch.Tensor):
        """Decode update: write back to the arena, append to the tail, return ``selected ⊕ tail``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.length = self.arena.append(self.slot, key_states, value_states)
        end = self.selected + self.tail
        self._ensure_work(key_states, end + key_states.shape[2])
        self._work_keys[:, :, end : end + key_states.shape[2]].copy_(key_states)
        self._work_values[:, :, end : end + key_states.shape[2]].copy_(value_states)
        self.tail += key_states.shape[2]
        self.arena.wait(self.slot)  # the selected rows may still be landing on the transfer stream
        stop = self.selected + self.tail
        self.keys, self.values = self._work_keys[:, :, :stop], self._work_values[:, :, :stop]
        return self.keys, self.values

    def _ensure_work(self, like: torch.Tensor, needed: int) -> None:
        used = self.selected + self.tail
        self._work_keys = _grow(self._work_keys, like, used, needed)
        self._work_values = _grow(self._work_values, like, used, needed)

    def selection_slots(self, count: int, context_len: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Make room for ``count`` selected rows in front of the tail and return those views to fill."""
        if count != self.selected and self.tail:
            # the tail moves; copy it back from the arena (it holds every token)
            tail_keys, tail_values = self.arena.read(self.slot, context_len + self.tail, start=context_len)
            self.selected = 0
            self._ensure_work(like, count + self.tail)
            self._work_keys[:, :, count : count + self.tail].copy_(tail_keys)
            self._work_values[:, :, count : count + self.tail].copy_(tail_values)
        else:
            self._ensure_work(like, count + self.tail)
        self.selected = count
        return self._work_keys[:, :, :count], self._work_values[:, :, :count]

    def work_bytes(self) -> tuple[int, int]:
        """(bytes of selected rows, bytes of tail rows) currently held on the compute device."""
        if self._work_keys is None:
            return 0, 0
        per_token = 2 * self._work_keys.shape[0] * self._work_keys.shape[1] * self._work_keys.shape[3]
        per_token *= self._work_keys.element_size()
        return self.selected * per_token, self.tail * per_token

    def nbytes(self) -> int:
        buffers = (self._work_keys, self._work_values)
        return sum(b.numel() * b.element_size() for b in buffers if b is not None)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._work_keys = _select_batch(self._work_keys, beam_idx)
        self._work_values = _select_batch(self._work_values, beam_idx)

    batch_select_indices = reorder_cache

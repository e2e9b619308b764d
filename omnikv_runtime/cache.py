"""The tiered OmniKV cache: a transformers ``Cache`` whose layers hold the KV in tiers.

The model's attention modules call ``cache.update(k, v, layer_idx)`` and then the registered
``"omnikv"`` attention function. ``update`` stores the new KV in the right tier and leaves a note
(:class:`AttentionNote`) that the attention function picks up on the same thread: which layer,
which tensors it returned, and for a sparse layer which cache columns they are. A filter layer's
attention then scores the context and calls :meth:`OmniKVCache.select`, which fetches the chosen
rows for every sparse layer of its segment.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from omnikv_runtime.cache_layers import DenseLayerKV, SparseLayerKV
from omnikv_runtime.layout import LayerPlan, Role
from omnikv_runtime.policies import EvictionPolicy, LRUEviction, SelectionContext, SelectionPolicy
from omnikv_runtime.transfer import HostArena, HotCache, TransferEngine

_NOTES = threading.local()


@dataclass
class AttentionNote:
    """What ``update`` tells the attention function that runs right after it."""

    cache: OmniKVCache
    layer_idx: int
    keys: torch.Tensor  # the tensor update returned (identity proves the note is current)
    columns: torch.Tensor | None  # sparse decode: cache column of each returned key, [batch, n]


def take_note(layer_idx: int, keys: torch.Tensor) -> AttentionNote | None:
    """The note left by this layer's ``update`` for exactly these keys, or None (no OmniKV cache)."""
    note = getattr(_NOTES, "note", None)
    _NOTES.note = None
    if note is None or note.layer_idx != layer_idx or note.keys is not keys:
        return None
    return note


class OmniKVCache(Cache):
    """KV cache with a GPU dense tier, per-segment host arenas, and selected + tail working buffers.

    Args:
        plan: the role of every layer.
        policy: the selection policy of the filter layers.
        budget: maps a context length to the number of tokens a sparse layer sees.
        transfer: moves rows between the host tier and the compute device.
        reserve_tokens: capacity to allocate up front (prompt + new tokens), to avoid regrowth.
        prompt_tokens: length of the prompt (padded), when known. A one-token forward is decode only
            once this many tokens are in the cache, so a chunked prefill whose last chunk is a single
            token stays a prefill. Without it, every one-token forward after the first is decode.
        hot_cache_tokens: rows of the GPU hot cache per segment (0: none); each step then fetches
            only the selected rows the hot cache lacks. Meant for an offloaded host tier.
        eviction: which hot-cache rows make room for new ones (default LRU).
    """

    def __init__(
        self,
        plan: LayerPlan,
        policy: SelectionPolicy,
        budget: Callable[[int], int],
        transfer: TransferEngine,
        reserve_tokens: int = 0,
        prompt_tokens: int = 0,
        hot_cache_tokens: int = 0,
        eviction: EvictionPolicy | None = None,
    ) -> None:
        layers: list[DenseLayerKV | SparseLayerKV] = []
        slots = {}
        for segment in plan.segments:
            slots.update({layer: slot for slot, layer in enumerate(segment.sparse_layers)})
        for layer, role in enumerate(plan.roles):
            layers.append(SparseLayerKV(slots[layer]) if role is Role.SPARSE else DenseLayerKV(reserve_tokens))
        super().__init__(layers=layers)
        self.plan = plan
        self.policy = policy
        self.budget = budget
        self.transfer = transfer
        self.reserve_tokens = reserve_tokens
        self.prompt_tokens = prompt_tokens
        self.arenas: list[HostArena | None] = [None] * len(plan.segments)
        self.hot_cache_tokens = hot_cache_tokens
        self.eviction = eviction if eviction is not None else LRUEviction()
        self.hot_caches: list[HotCache | None] = [None] * len(plan.segments)
        self.context_len = 0  # tokens a filter layer may select from (everything up to the last prefill)
        self.decoding = False
        self.selections: dict[int, torch.Tensor] = {}  # segment -> indices [batch, k]
        self._segment_columns: dict[int, tuple[int, torch.Tensor]] = {}  # segment -> (tail, columns)
        self._recent: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # filter layer -> (queries, positions)
        self.selected_log: list[dict[int, int]] = []  # per decode step: filter layer -> tokens selected
        self.forward_starts: list[tuple[float, bool]] = []  # (time, decoding) at the start of each forward
        self.selection_trace: list[dict[str, object]] | None = None  # a list records every selection (host sync!)

    # transformers' entry point -------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            self._begin_forward(key_states.shape[2])
        layer = self.layers[layer_idx]
        columns = None
        if isinstance(layer, SparseLayerKV):
            self._ensure_arena(layer_idx, key_states)
            if self.decoding:
                keys, values = layer.update_decode(key_states, value_states)
                columns = self._columns(layer_idx, layer.tail)
            else:
                keys, values = layer.update(key_states, value_states)
        else:
            keys, values = layer.update(key_states, value_states)
        _NOTES.note = AttentionNote(self, layer_idx, keys, columns)
        return keys, values

    def _begin_forward(self, query_len: int) -> None:
        past = self.get_seq_length()
        if past == 0:
            self.policy.reset()  # a new request: stateful policies start afresh
        self.decoding = query_len == 1 and past > 0 and past >= self.prompt_tokens
        if not self.decoding:  # prefill (or a new turn): every token so far becomes selectable context
            self.context_len = past + query_len
            self.selections.clear()
            self._segment_columns.clear()
        else:
            self.selected_log.append({})
        self.forward_starts.append((time.perf_counter(), self.decoding))

    def _ensure_arena(self, layer_idx: int, like: torch.Tensor) -> None:
        segment = self.plan.segment_of[layer_idx]
        if self.arenas[segment] is None:
            batch, heads, count, dim = like.shape
            capacity = max(self.reserve_tokens, self.layers[layer_idx].get_seq_length() + count)
            arena = HostArena(
                self.transfer, batch, len(self.plan.segments[segment].sparse_layers), heads, dim, like.dtype, capacity
            )
            self.arenas[segment] = arena
            for layer in self.plan.segments[segment].sparse_layers:
                self.layers[layer].arena = arena
            self._build_hot_cache(segment, like.device)

    def _build_hot_cache(self, segment: int, device: torch.device) -> None:
        arena = self.arenas[segment]
        self.hot_caches[segment] = None
        if self.hot_cache_tokens and arena is not None:
            batch = arena.data.shape[0]
            self.hot_caches[segment] = HotCache(
                self.eviction, batch, self.hot_cache_tokens, arena.row_shape, arena.dtype, device, arena.capacity
            )

    def resize_hot_cache(self, hot_cache_tokens: int, device: torch.device) -> None:
        """Replace every segment's hot cache by an empty one of ``hot_cache_tokens`` rows (0: none)."""
        self.hot_cache_tokens = hot_cache_tokens
        for segment in range(len(self.plan.segments)):
            self._build_hot_cache(segment, device)

    def _columns(self, layer_idx: int, tail: int) -> torch.Tensor:
        """Cache columns of a sparse layer's returned keys: its selection, then the tail.

        The same for every sparse layer of a segment within a step, so built once per segment and step.
        """
        segment = self.plan.segment_of[layer_idx]
        cached = self._segment_columns.get(segment)
        if cached is not None and cached[0] == tail:
            return cached[1]
        keys = self.layers[layer_idx].keys
        batch, device = keys.shape[0], keys.device
        columns = torch.arange(self.context_len, self.context_len + tail, device=device).expand(batch, tail)
        selected = self.selections.get(segment)
        if selected is not None:
            columns = torch.cat([selected.to(device), columns], dim=1)
        self._segment_columns[segment] = (tail, columns)
        return columns

    # called by the attention function of a filter layer ----------------------------------
    def remember_queries(self, layer_idx: int, queries: torch.Tensor) -> None:
        """Keep the last ``policy.window_size`` queries of a filter layer (oldest first)."""
        window = self.policy.window_size
        end = self.get_seq_length()  # update already counted this forward's tokens
        new_positions = torch.arange(end - queries.shape[2], end, device=queries.device)
        if layer_idx in self._recent:
            old_queries, old_positions = self._recent[layer_idx]
            queries = torch.cat([old_queries, queries], dim=2)
            new_positions = torch.cat([old_positions, new_positions])
        self._recent[layer_idx] = (queries[:, :, -window:].detach(), new_positions[-window:])

    def select(self, layer_idx: int, keys: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
        """Run the policy for a filter layer's segment and fetch the chosen rows of its sparse layers."""
        segment = self.plan.segment_of[layer_idx]
        queries, positions = self._recent[layer_idx]
        context = SelectionContext(
            queries=queries,
            query_positions=positions,
            keys=keys[:, :, : self.context_len],
            valid=valid[:, : self.context_len],
            budget=self.budget(self.context_len),
            scaling=scaling,
            layer=layer_idx,
        )
        indices = self.policy.select(context)
        self.selections[segment] = indices
        self._segment_columns.pop(segment, None)
        sparse_layers = self.plan.segments[segment].sparse_layers
        if sparse_layers and self.arenas[segment] is not None:
            outputs = [
                self.layers[layer].selection_slots(indices.shape[1], self.context_len, keys) for layer in sparse_layers
            ]
            self.arenas[segment].gather(indices, outputs, self.hot_caches[segment])
        if self.selected_log:
            self.selected_log[-1][layer_idx] = indices.shape[1]
        if self.selection_trace is not None:
            step = len(self.selected_log) - 1
            self.selection_trace.append({"step": step, "layer": layer_idx, "indices": indices.detach().cpu()})
        return indices

    # filling without the model ----------------------------------------------------------------
    def append_prompt_kv(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store prompt KV ``[batch, kv_heads, n, head_dim]`` for one layer without running the model.

        Benchmarks and capacity runs fill a long context this way (a 128K prefill costs minutes):
        append the same number of tokens to every layer, chunk by chunk, then decode as usual.
        """
        layer = self.layers[layer_idx]
        if isinstance(layer, SparseLayerKV):
            self._ensure_arena(layer_idx, keys)
            if not layer.is_initialized:
                layer.lazy_initialization(keys, values)
            layer.length = layer.arena.append(layer.slot, keys, values)
            layer.selected = layer.tail = 0
        else:
            layer.update(keys, values)
        self.context_len = self.prompt_tokens = self.get_seq_length()
        self.selections.clear()
        self._segment_columns.clear()

    # reporting ------------------------------------------------------------------------------
    def hot_counters(self) -> dict[str, int]:
        """Hot-cache hits, misses and bytes saved over all segments (reads device counters)."""
        totals = {"hot_hits": 0, "hot_misses": 0, "hot_bytes_saved": 0, "hot_bytes_fetched": 0}
        for hot in self.hot_caches:
            if hot is not None:
                for name, value in hot.counters().items():
                    totals[name] += value
        return totals

    def tier_bytes(self) -> dict[str, int]:
        """Bytes allocated per tier: GPU dense, GPU selected, GPU tail, host (allocated and used)."""
        dense = sum(layer.nbytes() for layer in self.layers if isinstance(layer, DenseLayerKV))
        selected = tail = work = 0
        for layer in self.layers:
            if isinstance(layer, SparseLayerKV):
                layer_selected, layer_tail = layer.work_bytes()
                selected, tail, work = selected + layer_selected, tail + layer_tail, work + layer.nbytes()
        arenas = [arena for arena in self.arenas if arena is not None]
        return {
            "gpu_dense": dense,
            "gpu_selected": selected,
            "gpu_tail": tail,
            "gpu_working_allocated": work,
            "gpu_hot": sum(hot.nbytes() for hot in self.hot_caches if hot is not None),
            "host": sum(arena.used_bytes() for arena in arenas),
            "host_allocated": sum(arena.nbytes() for arena in arenas),
        }

    # transformers' batch bookkeeping ----------------------------------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)
        for store in (*self.arenas, *self.hot_caches):
            if store is not None:
                store.select_batch(beam_idx)
        for segment, indices in self.selections.items():
            self.selections[segment] = indices.index_select(0, beam_idx.to(indices.device))
        self._segment_columns.clear()
        for layer, (queries, positions) in self._recent.items():
            self._recent[layer] = (queries.index_select(0, beam_idx.to(queries.device)), positions)

    batch_select_indices = reorder_cache

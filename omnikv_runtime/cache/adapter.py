"""The tiered OmniKV cache: a transformers ``Cache`` whose layers hold the KV in tiers.

The model's attention modules call ``cache.update(k, v, layer_idx)`` and then the registered
``"omnikv"`` attention function. ``update`` stores the new KV in the right tier and leaves a note
(:class:`AttentionNote`) that the attention function picks up on the same thread.

**Prefill** (more than one query, or a cache still short of ``prompt_tokens``) appends to growing
tiers and attends through the model's own attention implementation and mask.

**Decode** is static: every buffer a step touches exists before the step, the step's position
lives in device counters (:class:`~omnikv_runtime.cache.counters.DecodeCounters`), and ``update``
writes at that position and hands the attention function :class:`~omnikv_runtime.kernels.KVSource`
descriptions of what to read (a dense layer's buffer up to the device length; a sparse layer's
selected rows and tail ring). A filter layer's attention then scores the context and calls
:meth:`OmniKVCache.select`, which starts the fetch of its segment's rows. Nothing in a step reads
a value back to the host or depends on one that changes, so the same code runs step by step under
``model.generate`` and is captured once in a CUDA graph by the engine's decode loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from omnikv_runtime.cache.counters import DecodeCounters
from omnikv_runtime.cache.layers import DenseLayerKV, SparseLayerKV
from omnikv_runtime.cache.segment import SegmentState
from omnikv_runtime.kernels import KVSource
from omnikv_runtime.layout import LayerPlan, Role, tail_ring_tokens
from omnikv_runtime.listeners import EngineListener, announce_forward, fetch_with_events
from omnikv_runtime.policies import EvictionPolicy, LRUEviction, SelectionContext, SelectionPolicy
from omnikv_runtime.transfer import HostArena, HotCache, TransferEngine

_NOTES = threading.local()


@dataclass
class AttentionNote:
    """What ``update`` tells the attention function that runs right after it."""

    cache: OmniKVCache
    layer_idx: int
    keys: torch.Tensor  # the tensor update returned (identity proves the note is current)
    sources: list[KVSource] | None  # decode: what this layer attends to; None during prefill


def take_note(layer_idx: int, keys: torch.Tensor) -> AttentionNote | None:
    """The note left by this layer's ``update`` for exactly these keys, or None (no OmniKV cache)."""
    note = getattr(_NOTES, "note", None)
    _NOTES.note = None
    if note is None or note.layer_idx != layer_idx or note.keys is not keys:
        return None
    return note


class OmniKVCache(Cache):
    """KV cache with a GPU dense tier, per-segment host arenas, and static decode buffers.

    Args:
        plan: the role of every layer.
        policy: the selection policy of the filter layers (its per-request state lives here).
        budget: maps a context length to the number of tokens a sparse layer sees.
        transfer: moves rows between the host tier and the compute device.
        reserve_tokens: capacity to allocate up front (prompt + new tokens), to avoid regrowth.
        prompt_tokens: length of the prompt (padded), when known. A one-token forward is decode only
            once this many tokens are in the cache, so a chunked prefill whose last chunk is a single
            token stays a prefill. Without it, every one-token forward after the first is decode.
        hot_cache_tokens: rows of the GPU hot cache per segment (0: none); each step then fetches
            only the selected rows the hot cache lacks. Meant for an offloaded host tier.
        eviction: which hot-cache rows make room for new ones (default LRU).
        tail_tokens: slots of the tail ring (generated tokens every sparse layer sees); older
            generated tokens join the selectable context. None: every generated token stays in
            the tail (the ring starts at the reserve's new tokens and grows if a run goes past them).
        listeners: observers called on each forward's start, selection and fetch (see
            :mod:`omnikv_runtime.listeners`); an engine passes its own list, so listeners it adds
            later apply to its caches too. Called only in eager steps, never while a CUDA graph
            records or replays.
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
        tail_tokens: int | None = None,
        listeners: list[EngineListener] | None = None,
    ) -> None:
        layers: list[DenseLayerKV | SparseLayerKV] = []
        slots = {}
        for segment in plan.segments:
            slots.update({layer: (segment.index, slot) for slot, layer in enumerate(segment.sparse_layers)})
        for layer, role in enumerate(plan.roles):
            layers.append(SparseLayerKV(*slots[layer]) if role is Role.SPARSE else DenseLayerKV(reserve_tokens))
        super().__init__(layers=layers)
        self.plan = plan
        self.policy = policy
        self.budget = budget
        self.transfer = transfer
        self.reserve_tokens = reserve_tokens
        self.prompt_tokens = prompt_tokens
        self.hot_cache_tokens = hot_cache_tokens
        self.eviction = eviction if eviction is not None else LRUEviction()
        self.tail_tokens = tail_tokens
        self.listeners = listeners if listeners is not None else []
        self.segments = [SegmentState(segment, policy.window_size) for segment in plan.segments]
        self.context_len = 0  # tokens a filter layer may select from at the last prefill
        self.decoding = False
        self.decode_steps = 0  # tokens decoded since the last prefill (host-side count)
        self.ring_tokens = 0  # slots of the tail rings
        self.budget_tokens = 0  # k: rows a sparse layer sees, fixed at the start of decoding
        self.counters: DecodeCounters | None = None
        self.valid: torch.Tensor | None = None  # [batch, capacity] bool: real tokens (False at padding)
        self.selectable: torch.Tensor | None = None  # [batch, capacity] bool: valid and inside the context
        self._columns: torch.Tensor | None = None  # [batch, capacity] int64: 0..capacity-1 in each row
        self._prompt_valid: torch.Tensor | None = None  # [batch, columns] from the prefill's mask
        self.capturing = False  # a CUDA graph is recording: host-side counts are the runner's business
        self.fused_layers = False  # decoder layers given the fused forward run it for this cache
        self.tensor_parallel_group = None  # with tensor parallelism: the ranks holding the other heads
        self.rope_inv_freq: torch.Tensor | None = None  # the model's rotary frequencies, for the policy (engine sets)
        # per decode step: filter layer -> tokens selected (the runtime's own account; a CUDA-graph
        # runner adds its replayed steps)
        self.selected_log: list[dict[int, int]] = []

    # compatibility views ----------------------------------------------------------------------
    @property
    def arenas(self) -> list[HostArena | None]:
        return [segment.arena for segment in self.segments]

    @property
    def hot_caches(self) -> list[HotCache | None]:
        return [segment.hot for segment in self.segments]

    @property
    def selections(self) -> dict[int, torch.Tensor]:
        """Segment -> the last selection ``[batch, k]`` of this decode phase."""
        return {s.index: s.selection for s in self.segments if s.selection is not None and self.decode_steps}

    # transformers' entry point -------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            self._begin_forward(key_states)
        layer = self.layers[layer_idx]
        sources = None
        if self.decoding:
            sources = self._decode_update(layer, key_states, value_states)
            # what HF's attention module passes on: the first source, head-major (the note has the rest)
            keys, values = sources[0].keys.transpose(1, 2), sources[0].values.transpose(1, 2)
        elif isinstance(layer, SparseLayerKV):
            self._ensure_arena(layer, key_states)
            self._prefetch_sparse_after(layer_idx)
            keys, values = layer.update(key_states, value_states)
        else:
            keys, values = layer.update(key_states, value_states)
        _NOTES.note = AttentionNote(self, layer_idx, keys, sources)
        return keys, values

    def _begin_forward(self, like: torch.Tensor) -> None:
        past = self.get_seq_length()
        was_decoding = self.decoding
        self.decoding = like.shape[2] == 1 and past > 0 and past >= self.prompt_tokens
        if not self.decoding:  # prefill (or a new turn): every token so far becomes selectable context
            self.context_len = past + like.shape[2]
            self.decode_steps = 0
            self.transfer.discard_prefetches()
            self._prefetch_sparse_after(-1)
        else:
            if not was_decoding or self.counters is None:
                self._start_decode(like)
            self.ensure_room(like)
            self.counters.advance(self.ring_tokens)
            torch.lt(self._columns, self.counters.context_len[:, None], out=self.selectable)
            self.selectable.logical_and_(self.valid)
            if not self.capturing:
                self.advance_host(1)
                self.selected_log.append({})
        if self.listeners and not self.capturing:
            announce_forward(self, like.shape[2], past)

    def _start_decode(self, like: torch.Tensor) -> None:
        """Allocate what decode steps touch and point the device counters at the first step."""
        past = self.get_seq_length()
        if self.counters is None or self.counters.batch != like.shape[0]:
            self.counters = DecodeCounters(like.shape[0], like.device)
        self.counters.start(past)
        self.budget_tokens = self.budget(self.context_len)
        self.ring_tokens = tail_ring_tokens(self.tail_tokens, self.reserve_tokens, past)
        batch = like.shape[0]
        prompt_valid = self._prompt_valid
        if prompt_valid is None or prompt_valid.shape[0] != batch:
            prompt_valid = torch.ones(batch, past, dtype=torch.bool, device=like.device)
        self._prompt_valid = prompt_valid[:, :past].to(like.device)
        if self.valid is not None and self.valid.shape[0] == batch:  # reused in place (a captured step reads it)
            self.valid.fill_(True)
            self.valid[:, :past].copy_(self._prompt_valid)
        for segment in self.segments:
            segment.ensure_ring(batch, self.ring_tokens, like.device)
            if segment.ring is not None:
                segment.ring.zero_()
            if self.policy.window_size > 1:
                segment.window.start_decode()

    def ensure_room(self, like: torch.Tensor, steps: int = 1) -> None:
        """Make room for ``steps`` more decode steps now (buffers grow, at least doubling). A decode
        loop calls it before capturing a step: a replay keeps the buffers it was recorded with."""
        needed = self.get_seq_length() + steps
        dense = [layer for layer in self.layers if isinstance(layer, DenseLayerKV)]
        for layer in dense:
            layer.ensure_capacity(like, needed)
        capacity = min(layer.capacity for layer in dense)
        if self.valid is None or self.valid.shape != (like.shape[0], capacity):
            self.valid = torch.ones(like.shape[0], capacity, dtype=torch.bool, device=like.device)
            self.valid[:, : self._prompt_valid.shape[1]].copy_(self._prompt_valid)
            self.selectable = torch.empty_like(self.valid)
            self._columns = torch.arange(capacity, device=like.device).expand_as(self.valid)
        for segment in self.segments:
            if segment.arena is not None:
                segment.arena.ensure_capacity(needed)
                if segment.hot is not None:
                    segment.hot.ensure_tokens(segment.arena.capacity)
        if self.tail_tokens is None and self.decode_steps + steps > self.ring_tokens:  # every generated token stays
            self.ring_tokens = max(2 * self.ring_tokens, self.decode_steps + steps)
            for segment in self.segments:
                segment.ensure_ring(like.shape[0], self.ring_tokens, like.device)

    def start_decoding(self, like: torch.Tensor) -> None:
        """Enter decoding now (after a prefill), so that the first step may be a replayed graph."""
        self.decoding = True
        self._start_decode(like)
        self.ensure_room(like)

    def reset(self) -> None:
        """Forget the request; keep every buffer, so that a captured decode step can serve the next
        request of the same shape (its prefill writes into the same tiers)."""
        for layer in self.layers:
            layer.length = 0
        for segment in self.segments:
            segment.policy_state.clear()
            segment.window.forget_prefill()
            if segment.arena is not None:
                segment.arena.lengths = [0] * len(segment.arena.lengths)
            if segment.hot is not None:
                segment.hot.reset()
        self.context_len = self.decode_steps = 0
        self.decoding = False
        self._prompt_valid = None
        self.selected_log.clear()

    def advance_host(self, steps: int) -> None:
        """Move the host-side counts forward by ``steps`` decoded tokens (eager steps do this
        themselves; a CUDA-graph runner calls it for the steps it replayed)."""
        for layer in self.layers:
            layer.length += steps
            if isinstance(layer, DenseLayerKV):
                layer.refresh_views()
        for segment in self.segments:
            if segment.arena is not None:
                segment.arena.lengths = [length + steps for length in segment.arena.lengths]
        self.decode_steps += steps

    def _decode_update(self, layer, key_states: torch.Tensor, value_states: torch.Tensor) -> list[KVSource]:
        counters = self.counters
        if isinstance(layer, DenseLayerKV):
            layer.write_at(key_states, value_states, counters.position)
            source = KVSource(
                layer.key_buffer.transpose(1, 2),
                layer.value_buffer.transpose(1, 2),
                length=counters.length,
                mask=self.valid,
            )
            return [source]
        segment = self.segments[layer.segment]
        segment.store_token(layer.slot, key_states, value_states, counters)
        if layer.slot == len(segment.sparse_layers) - 1:
            segment.write_back(self.transfer, counters)
        if segment.staging is not None:
            self.transfer.wait(segment.arena.data, layer.slot)  # its rows may still be landing
        return segment.sources(layer.slot, counters)

    def _prefetch_sparse_after(self, layer_idx: int) -> None:
        """A chunk after the first: start reading the next sparse layer's earlier tokens from the host tier."""
        following = next((index for index in self.plan.sparse_layers if index > layer_idx), None)
        if following is not None:
            layer = self.layers[following]
            if layer.arena is not None and layer.length > 0:
                layer.arena.prefetch(layer.slot, layer.length)

    def _ensure_arena(self, layer: SparseLayerKV, like: torch.Tensor) -> None:
        segment = self.segments[layer.segment]
        if segment.arena is None or segment.arena.data.shape[0] != like.shape[0]:
            batch, heads, count, dim = like.shape
            capacity = max(self.reserve_tokens, layer.get_seq_length() + count)
            layers = len(segment.sparse_layers)
            segment.arena = HostArena(self.transfer, batch, layers, heads, dim, like.dtype, capacity)
            segment.ring = None
            for sparse in segment.sparse_layers:
                self.layers[sparse].arena = segment.arena
            self._build_hot_cache(segment, like.device)

    def _build_hot_cache(self, segment: SegmentState, device: torch.device) -> None:
        arena = segment.arena
        segment.hot = None
        if self.hot_cache_tokens and arena is not None:
            batch = arena.data.shape[0]
            segment.hot = HotCache(
                self.eviction,
                batch,
                self.hot_cache_tokens,
                arena.row_shape,
                arena.dtype,
                device,
                arena.capacity,
                host_row_bytes=arena.fetch_row_bytes,
            )

    def resize_hot_cache(self, hot_cache_tokens: int, device: torch.device) -> None:
        """Replace every segment's hot cache by an empty one of ``hot_cache_tokens`` rows (0: none)."""
        self.hot_cache_tokens = hot_cache_tokens
        for segment in self.segments:
            self._build_hot_cache(segment, device)

    # called by the attention function ------------------------------------------------------------
    def record_prompt_mask(self, valid: torch.Tensor) -> None:
        """Prefill: which of the columns so far are real tokens, ``[batch, columns]`` bool."""
        self._prompt_valid = valid

    def remember_queries(self, layer_idx: int, queries: torch.Tensor) -> None:
        """Prefill: keep the filter layer's last ``policy.window_size`` queries (oldest first)."""
        if self.policy.window_size <= 1:
            return  # decode scores with the step's own query
        end = self.get_seq_length()  # update already counted this forward's tokens
        positions = torch.arange(end - queries.shape[2], end, device=queries.device)
        self.segments[self.plan.segment_of[layer_idx]].window.extend(queries, positions)

    def select(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Decode: run the policy for a filter layer's segment and start fetching the chosen rows."""
        segment = self.segments[self.plan.segment_of[layer_idx]]
        counters = self.counters
        position = counters.position[:1]  # the rows of one generate call share their columns
        if self.policy.window_size > 1 and segment.window.queries is not None:
            segment.window.push(query, position)
            queries, positions = segment.window.queries, segment.window.positions
        else:
            queries, positions = query, position
        # the selectable context is the prompt, unless a bounded tail ring lets generated tokens join
        # it: then it grows each step, and the policy sees every column with the rest masked
        width = self.selectable.shape[1] if self.tail_tokens else self.context_len
        keys = self.layers[layer_idx].key_buffer[:, :, :width]
        context = SelectionContext(
            queries=queries,
            query_positions=positions,
            keys=keys,
            valid=self.selectable[:, :width],
            budget=min(self.budget_tokens, width),
            scaling=scaling,
            layer=layer_idx,
            state=segment.policy_state,
            head_group=self.tensor_parallel_group,
            rope_inv_freq=self.rope_inv_freq,
        )
        indices = self.policy.select(context)
        if not self.capturing:
            self.selected_log[-1][layer_idx] = indices.shape[1]
        if self.listeners and not self.capturing:  # eager steps only; without listeners no event, no clock
            fetch_with_events(self, segment, context, indices)
        else:
            segment.set_selection(indices, self.selectable, self.transfer)
        return indices

    # filling without the model ----------------------------------------------------------------
    def append_prompt_kv(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store prompt KV ``[batch, kv_heads, n, head_dim]`` for one layer without running the model.

        Benchmarks and capacity runs fill a long context this way (a 128K prefill costs minutes):
        append the same number of tokens to every layer, chunk by chunk, then decode as usual.
        """
        layer = self.layers[layer_idx]
        if isinstance(layer, SparseLayerKV):
            self._ensure_arena(layer, keys)
            if not layer.is_initialized:
                layer.lazy_initialization(keys, values)
            layer.length = layer.arena.append(layer.slot, keys, values)
        else:
            layer.update(keys, values)
        self.context_len = self.prompt_tokens = self.get_seq_length()
        self.decoding = False
        self.decode_steps = 0
        self._prompt_valid = None

    # reporting ------------------------------------------------------------------------------
    def policy_states(self) -> dict[int, dict]:
        """Filter layer -> the selection policy's per-request state for it."""
        return {segment.filter_layer: segment.policy_state for segment in self.segments}

    def hot_counters(self) -> dict[str, int]:
        """Hot-cache hits, misses and bytes saved over all segments (reads device counters)."""
        totals = {"hot_hits": 0, "hot_misses": 0, "hot_bytes_saved": 0, "hot_bytes_fetched": 0}
        for hot in self.hot_caches:
            if hot is not None:
                for name, value in hot.counters().items():
                    totals[name] += value
        return totals

    def tier_bytes(self) -> dict[str, int]:
        """Bytes allocated per tier: GPU dense, GPU selected, GPU tail, GPU hot, host (allocated and used)."""
        dense = sum(layer.nbytes() for layer in self.layers if isinstance(layer, DenseLayerKV))
        gpu = [segment.gpu_bytes() for segment in self.segments]
        arenas = [arena for arena in self.arenas if arena is not None]
        return {
            "gpu_dense": dense,
            "gpu_selected": sum(g["selected"] for g in gpu),
            "gpu_tail": sum(g["tail"] for g in gpu),
            "gpu_hot": sum(g["hot"] for g in gpu),
            "host": sum(arena.used_bytes() for arena in arenas),
            "host_allocated": sum(arena.nbytes() for arena in arenas),
        }

    # transformers' batch bookkeeping ----------------------------------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for layer in self.layers:
            layer.reorder_cache(beam_idx)
        for segment in self.segments:
            segment.select_batch(beam_idx)
        for name in ("valid", "selectable", "_prompt_valid"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, beam_idx.to(tensor.device)))

    batch_select_indices = reorder_cache

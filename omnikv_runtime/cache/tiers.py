"""Every buffer of a tiered cache, and the two things done with them: storing KV and reading it.

:class:`Tiers` owns the per-layer KV objects (dense layers' GPU buffers; sparse layers' place in
their segment's host arena), each segment's state (:class:`~omnikv_runtime.cache.segment.SegmentState`:
arena, tail ring, selection, staging, hot cache, query window) and the per-column masks a decode
step reads (real tokens, and the context a filter layer may select from). It allocates them,
grows them outside any recorded step, counts their bytes (:meth:`Tiers.tier_bytes`, the figures
the memory planner predicts) and hands a decode step's attention what to read
(:meth:`Tiers.decode_sources`). It knows nothing of transformers, of policies, or of requests.

``generation`` counts the times a buffer that a decode step reads was replaced: a recorded step
holds the addresses it was recorded with, so a recording is valid only for the generation it was
made in.
"""

from __future__ import annotations

import torch

from omnikv_runtime.cache.counters import DecodeCounters
from omnikv_runtime.cache.layers import DenseLayerKV, SparseLayerKV
from omnikv_runtime.cache.segment import SegmentState
from omnikv_runtime.kernels import KVSource
from omnikv_runtime.layout import LayerPlan, Role
from omnikv_runtime.policies import EvictionPolicy, LRUEviction
from omnikv_runtime.transfer import HostArena, HotCache, TransferEngine


class Tiers:
    """The dense buffers and segment states of one cache (see the module docstring).

    Args:
        plan: the role of every layer.
        transfer: moves rows between the host tier and the compute device.
        window_size: queries the selection policy reads (each segment keeps a window of them).
        reserve_tokens: token capacity to allocate up front (prompt + new tokens).
        hot_cache_tokens: rows of each segment's GPU hot cache (0: none).
        eviction: which hot-cache rows make room for new ones (default LRU).
        read_block_tokens: a sparse layer's earlier tokens a prefill chunk reads back from the host
            tier at a time (the config's ``prefill.read_block_tokens``).
    """

    def __init__(
        self,
        plan: LayerPlan,
        transfer: TransferEngine,
        window_size: int = 1,
        reserve_tokens: int = 0,
        hot_cache_tokens: int = 0,
        eviction: EvictionPolicy | None = None,
        read_block_tokens: int = 4096,
    ) -> None:
        if read_block_tokens < 1:
            raise ValueError(f"read_block_tokens must be at least 1, got {read_block_tokens}")
        self.plan = plan
        self.read_block_tokens = read_block_tokens
        self.transfer = transfer
        self.reserve_tokens = reserve_tokens
        self.hot_cache_tokens = hot_cache_tokens
        self.eviction = eviction if eviction is not None else LRUEviction()
        self.segments = [SegmentState(s, window_size, transfer.fetches_rows) for s in plan.segments]
        sparse = {layer: (state, slot) for state in self.segments for slot, layer in enumerate(state.sparse_layers)}
        self.layers: list[DenseLayerKV | SparseLayerKV] = [
            SparseLayerKV(*sparse[layer], read_block_tokens) if role is Role.SPARSE else DenseLayerKV(reserve_tokens)
            for layer, role in enumerate(plan.roles)
        ]
        self.valid: torch.Tensor | None = None  # [rows, capacity] bool: real tokens (False at padding)
        self.selectable: torch.Tensor | None = None  # [rows, capacity] bool: valid and inside the context
        self.columns: torch.Tensor | None = None  # [rows, capacity] int64: 0..capacity-1 in each row
        self.generation = 0

    # views --------------------------------------------------------------------------------------
    @property
    def arenas(self) -> list[HostArena | None]:
        return [segment.arena for segment in self.segments]

    @property
    def hot_caches(self) -> list[HotCache | None]:
        return [segment.hot for segment in self.segments]

    @property
    def dense_layers(self) -> list[DenseLayerKV]:
        return [layer for layer in self.layers if isinstance(layer, DenseLayerKV)]

    def length(self) -> int:
        """Tokens stored (every layer holds the same number)."""
        return self.layers[0].get_seq_length()

    def rows_view(self, start: int, stop: int) -> Tiers:
        """Tiers over batch rows ``start..stop`` of these, in the same memory (writes land here). Token
        counts start at 0: the view is for a request prefilled into those rows, or a step over them."""
        view = Tiers.__new__(Tiers)
        view.__dict__.update(self.__dict__)
        view.layers = []
        view.segments = [segment.rows_view(start, stop) for segment in self.segments]
        for layer in self.layers:
            part = type(layer).__new__(type(layer))
            part.__dict__.update(layer.__dict__)
            part.length = 0
            if isinstance(layer, DenseLayerKV) and layer.key_buffer is not None:
                part.key_buffer, part.value_buffer = layer.key_buffer[start:stop], layer.value_buffer[start:stop]
                part.refresh_views()
            if isinstance(layer, SparseLayerKV):
                part.state = view.segments[layer.segment]
            view.layers.append(part)
        for name in ("valid", "selectable", "columns"):
            tensor = getattr(self, name)
            setattr(view, name, None if tensor is None else tensor[start:stop])
        return view

    # allocation (never inside a recorded step) -------------------------------------------------
    def allocate(
        self,
        rows: int,
        capacity: int,
        ring_tokens: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """Allocate everything at once for ``rows`` rows of ``capacity`` columns (a server's slots)."""
        like = torch.empty(rows, kv_heads, 1, head_dim, dtype=dtype, device=device)
        for layer in self.layers:
            layer.lazy_initialization(like, like)
            if isinstance(layer, DenseLayerKV):
                layer.ensure_capacity(like, capacity)
        for segment in self.segments:
            arena = HostArena(self.transfer, rows, len(segment.sparse_layers), kv_heads, head_dim, dtype, capacity)
            self._set_arena(segment, arena, device)
            segment.ensure_ring(rows, ring_tokens, device)
        self.valid = torch.ones(rows, capacity, dtype=torch.bool, device=device)
        self.selectable = torch.zeros_like(self.valid)
        self.columns = torch.arange(capacity, device=device).expand_as(self.valid)

    def _set_arena(self, segment: SegmentState, arena: HostArena, device: torch.device) -> None:
        segment.arena, segment.ring, segment.hot = arena, None, None
        if self.hot_cache_tokens:
            segment.hot = HotCache(
                self.eviction,
                arena.data.shape[0],
                self.hot_cache_tokens,
                arena.row_shape,
                arena.dtype,
                device,
                arena.capacity,
                host_row_bytes=arena.fetch_row_bytes,
            )
        self.generation += 1

    def set_hot_cache_tokens(self, tokens: int, device: torch.device) -> None:
        """Give every segment an empty hot cache of ``tokens`` rows (0: none), keeping the arenas."""
        self.hot_cache_tokens = tokens
        for segment in self.segments:
            if segment.arena is not None:
                ring = segment.ring
                self._set_arena(segment, segment.arena, device)
                segment.ring = ring

    def ensure_arena(self, layer: SparseLayerKV, like: torch.Tensor) -> None:
        """The arena of ``layer``'s segment, for ``like``'s batch (allocated on a sparse layer's first tokens)."""
        segment = self.segments[layer.segment]
        if segment.arena is None or segment.arena.data.shape[0] != like.shape[0]:
            batch, heads, count, dim = like.shape
            capacity = max(self.reserve_tokens, layer.get_seq_length() + count)
            arena = HostArena(self.transfer, batch, len(segment.sparse_layers), heads, dim, like.dtype, capacity)
            self._set_arena(segment, arena, like.device)

    def ensure_room(self, like: torch.Tensor, tokens: int, ring_tokens: int, prompt_valid: torch.Tensor) -> None:
        """Room for ``tokens`` tokens in every tier, and ``ring_tokens`` slots in the tail rings;
        buffers grow (at least doubling) and keep what they hold. ``prompt_valid`` ``[rows, columns]``
        marks the real tokens of the prompt (the masks start from it when they are allocated)."""
        rows = like.shape[0]
        dense = self.dense_layers
        for layer in dense:
            before = layer.key_buffer
            layer.ensure_capacity(like, tokens)
            self.generation += layer.key_buffer is not before
        capacity = min(layer.capacity for layer in dense) if dense else tokens
        if self.valid is None or self.valid.shape != (rows, capacity):
            self.valid = torch.ones(rows, capacity, dtype=torch.bool, device=like.device)
            self.valid[:, : prompt_valid.shape[1]].copy_(prompt_valid)
            self.selectable = torch.empty_like(self.valid)
            self.columns = torch.arange(capacity, device=like.device).expand_as(self.valid)
            self.generation += 1
        for segment in self.segments:
            if segment.arena is not None:
                data = segment.arena.data
                segment.arena.ensure_capacity(tokens)
                self.generation += segment.arena.data is not data
                if segment.hot is not None:
                    segment.hot.ensure_tokens(segment.arena.capacity)
            self.generation += segment.ensure_ring(rows, ring_tokens, like.device)

    def start_decode(self, prompt_valid: torch.Tensor) -> None:
        """A new decode phase over the same buffers: the masks from the prompt, empty tail rings, the
        query windows from the prefill."""
        if self.valid is not None and self.valid.shape[0] == prompt_valid.shape[0]:
            self.valid.fill_(True)
            self.valid[:, : prompt_valid.shape[1]].copy_(prompt_valid)
        for segment in self.segments:
            if segment.ring is not None:
                segment.ring.zero_()
            if segment.window.size > 1:
                segment.window.start_decode()

    # storing ---------------------------------------------------------------------------------------
    def store(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill: append a chunk's KV ``[rows, kv_heads, n, head_dim]`` to layer ``layer_idx``. A dense
        layer returns every token it holds; a sparse layer returns the chunk and describes its earlier
        tokens in its ``earlier`` (the attention function reads them from the host tier in blocks)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, SparseLayerKV):
            self.ensure_arena(layer, keys)
            self.prefetch_after(layer_idx)
        return layer.update(keys, values)

    def append(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append KV to layer ``layer_idx`` without reading anything back (a cache filled directly)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, SparseLayerKV):
            self.ensure_arena(layer, keys)
            layer.store(keys, values)
        else:
            layer.update(keys, values)

    def prefetch_after(self, layer_idx: int) -> None:
        """Start reading the next sparse layer's first block of earlier tokens from the host tier (a
        chunk after the first), so that its attention finds it on the device."""
        following = next((index for index in self.plan.sparse_layers if index > layer_idx), None)
        if following is not None:
            layer = self.layers[following]
            if layer.arena is not None and layer.length > 0:
                layer.arena.prefetch(layer.slot, min(layer.length, layer.read_block_tokens))

    # one decode step -----------------------------------------------------------------------------
    def update_selectable(self, counters: DecodeCounters) -> None:
        """The columns each row's filter layers may select this step: real tokens inside its context."""
        torch.lt(self.columns, counters.context_len[:, None], out=self.selectable)
        self.selectable.logical_and_(self.valid)

    def decode_sources(
        self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor, counters: DecodeCounters
    ) -> list[KVSource]:
        """Store the step's token of layer ``layer_idx`` and describe what its attention reads (each
        layer kind knows its own: see ``decode`` of the layer objects)."""
        return self.layers[layer_idx].decode(keys, values, counters, self.valid)

    def advance(self, steps: int) -> None:
        """Count ``steps`` decoded tokens in every layer and arena (eager steps, and replayed ones)."""
        for layer in self.layers:
            layer.advance(steps)
        for arena in self.arenas:
            if arena is not None:
                arena.advance(steps)

    def forget(self) -> None:
        """Forget the request; keep every buffer, so that a recorded decode step can serve the next
        request of the same shape (its prefill writes into the same tiers)."""
        for layer in self.layers:
            layer.forget()
        for segment in self.segments:
            segment.forget()

    # accounting -------------------------------------------------------------------------------------
    def tier_bytes(self) -> dict[str, int]:
        """Bytes allocated per tier: GPU dense, GPU selected, GPU tail, GPU hot, host (used and allocated)."""
        gpu = [segment.gpu_bytes() for segment in self.segments]
        arenas = [arena for arena in self.arenas if arena is not None]
        return {
            "gpu_dense": sum(layer.nbytes() for layer in self.dense_layers),
            "gpu_selected": sum(g["selected"] for g in gpu),
            "gpu_tail": sum(g["tail"] for g in gpu),
            "gpu_hot": sum(g["hot"] for g in gpu),
            "host": sum(arena.used_bytes() for arena in arenas),
            "host_allocated": sum(arena.nbytes() for arena in arenas),
        }

    def hot_counters(self) -> dict[str, int]:
        """Hot-cache hits, misses and bytes saved over all segments (reads device counters)."""
        totals = {"hot_hits": 0, "hot_misses": 0, "hot_bytes_saved": 0, "hot_bytes_fetched": 0}
        for hot in self.hot_caches:
            if hot is not None:
                for name, value in hot.counters().items():
                    totals[name] += value
        return totals

    def select_batch(self, index: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, as beam search asks."""
        for layer in self.layers:
            layer.reorder_cache(index)
        for segment in self.segments:
            segment.select_batch(index)
        for name in ("valid", "selectable"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.index_select(0, index.to(tensor.device)))
        if self.columns is not None:
            self.columns = self.columns[: index.numel()]
        self.generation += 1

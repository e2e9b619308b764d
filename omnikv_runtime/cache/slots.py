"""A cache whose batch rows are independent requests: the server's continuous batch.

:class:`OmniKVCache` serves one ``generate`` call: its rows share their columns (padding keeps them
aligned) and the tiers grow with the request. A :class:`SlotCache` is allocated once, at a fixed
number of rows (slots) and a fixed capacity per row, and each slot holds its own request:

- A request is **prefilled alone** through :meth:`SlotCache.row_cache`, an ordinary batch-1
  ``OmniKVCache`` whose buffers are views of the slot's row. The prefill writes the slot's dense
  buffers and host-tier rows in place (nothing is copied afterwards), in chunks, between decode
  steps of the others.
- :meth:`SlotCache.activate` then lets the slot join the decode steps; :meth:`SlotCache.release`
  takes it out. Its rows are reused by the next request.
- Each row decodes at its own position (the device counters are per row), so rows that joined at
  different times share one static step. An idle slot writes into a scratch column (the row's
  last) and attends to one column, so it costs almost nothing and disturbs no prefill.
- The filter layers select **per row**, exactly as the request alone would: the policy sees the
  row's own context width, budget, query window and state (batch-1 slices). The rows' selections
  are padded to the longest and the padding is masked out of attention. The shapes of a step
  therefore change when a request joins or leaves: :meth:`SlotCache.layout` says when, so a
  CUDA-graph runner records the step again.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from omnikv_runtime.cache.adapter import OmniKVCache
from omnikv_runtime.cache.counters import DecodeCounters, QueryWindow
from omnikv_runtime.cache.layers import DenseLayerKV
from omnikv_runtime.layout import LayerPlan
from omnikv_runtime.policies import SelectionContext, SelectionPolicy
from omnikv_runtime.transfer import HostArena, TransferEngine

logger = logging.getLogger(__name__)


@dataclass
class SlotRequest:
    """What a slot's filter layers need to select for its request as if it ran alone."""

    context: int  # prompt tokens: the selectable context
    budget: int  # tokens a sparse layer sees
    states: list[dict[str, Any]]  # per segment: the policy's per-request state
    windows: list[QueryWindow | None] = field(default_factory=list)  # per segment (query windows > 1)


@dataclass
class _Picks:
    """One segment's padded selection of every slot, and which of its entries are real."""

    indices: torch.Tensor  # [rows, width] int64
    keep: torch.Tensor  # [rows, width] bool: entry j of row r is one of r's own selected tokens
    counts: list[int]  # per row: entries ``keep`` marks real (host copy, so a step writes it only on change)


class SlotCache(OmniKVCache):
    """``rows`` slots of ``capacity`` columns each (see the module docstring).

    Args:
        plan, policy, budget, transfer: as for :class:`OmniKVCache`.
        rows: slots (the batch of every decode step).
        capacity: columns per slot; a request's prompt and new tokens must fit in ``capacity - 1``
            (the last column is the idle slots' scratch).
        new_tokens: tail-ring slots (tokens a request generates at most, unless ``tail_tokens``
            bounds the ring and lets older generated tokens join the selectable context).
        kv_heads, head_dim, dtype, device: the model's KV geometry.
        tail_tokens: ``omnikv.tail_tokens`` (None: every generated token stays in the ring).
    """

    def __init__(
        self,
        plan: LayerPlan,
        policy: SelectionPolicy,
        budget: Callable[[int], int],
        transfer: TransferEngine,
        rows: int,
        capacity: int,
        new_tokens: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        tail_tokens: int | None = None,
    ) -> None:
        super().__init__(plan, policy, budget, transfer, reserve_tokens=capacity, tail_tokens=tail_tokens)
        self.rows, self.capacity = rows, capacity
        like = torch.empty(rows, kv_heads, 1, head_dim, dtype=dtype, device=device)
        for layer in self.layers:
            layer.lazy_initialization(like, like)
            if isinstance(layer, DenseLayerKV):
                layer.ensure_capacity(like, capacity)
        for segment in self.segments:
            if not segment.sparse_layers:
                continue
            segment.arena = HostArena(transfer, rows, len(segment.sparse_layers), kv_heads, head_dim, dtype, capacity)
            for sparse in segment.sparse_layers:
                self.layers[sparse].arena = segment.arena
        self.ring_tokens = tail_tokens or max(new_tokens, 1)
        for segment in self.segments:
            segment.ensure_ring(rows, self.ring_tokens, device)
        self.counters = DecodeCounters(rows, device)
        self.valid = torch.ones(rows, capacity, dtype=torch.bool, device=device)  # a slot has no padding
        self.selectable = torch.zeros_like(self.valid)
        self._columns = torch.arange(capacity, device=device).expand_as(self.valid)
        self.active = torch.zeros(rows, dtype=torch.long, device=device)  # 1 where a request decodes
        self.requests: list[SlotRequest | None] = [None] * rows
        self._picks: list[_Picks | None] = [None] * len(self.segments)
        self._prefix: SlotCache | None = None  # the latest prefix view, with selection buffers of its own
        self.decoding = True
        for row in range(rows):
            self.counters.start(capacity - 1, 0, row=row)  # idle: the scratch column

    # slots --------------------------------------------------------------------------------------
    def row_cache(self, row: int, prompt_tokens: int) -> OmniKVCache:
        """A batch-1 cache whose buffers are views of slot ``row``: prefill the request through it."""
        if self.requests[row] is not None:
            raise RuntimeError(f"slot {row} is busy")
        cache = OmniKVCache(
            self.plan,
            self.policy,
            self.budget,
            self.transfer,
            reserve_tokens=self.capacity,
            prompt_tokens=prompt_tokens,
            tail_tokens=self.tail_tokens,
        )
        cache.fused_layers = self.fused_layers
        for mine, theirs in zip(self.layers, cache.layers, strict=True):
            theirs.dtype, theirs.device, theirs.is_initialized = mine.dtype, mine.device, True
            if isinstance(mine, DenseLayerKV):
                theirs.key_buffer = mine.key_buffer[row : row + 1]
                theirs.value_buffer = mine.value_buffer[row : row + 1]
                theirs.refresh_views()
        for mine, theirs in zip(self.segments, cache.segments, strict=True):
            if mine.arena is not None:
                theirs.arena = mine.arena.rows_view(row, row + 1)
                for sparse in theirs.sparse_layers:
                    cache.layers[sparse].arena = theirs.arena
        return cache

    def activate(self, row: int, prefilled: OmniKVCache) -> None:
        """Let slot ``row`` decode the request just prefilled through its :meth:`row_cache`."""
        prompt = prefilled.get_seq_length()
        if prompt + 1 >= self.capacity:
            raise ValueError(f"a prompt of {prompt} tokens leaves no room in slots of {self.capacity} columns")
        for mine, theirs in zip(self.layers, prefilled.layers, strict=True):
            if isinstance(mine, DenseLayerKV) and theirs.key_buffer.data_ptr() != mine.key_buffer[row].data_ptr():
                raise RuntimeError(f"the prefill of slot {row} outgrew the slot's {self.capacity} columns")
        self.transfer.synchronize()  # the prefill's writes to the host tier have landed
        windows = []
        for segment in prefilled.segments:
            window = None
            if self.policy.window_size > 1:
                segment.window.start_decode()
                window = segment.window if segment.window.queries is not None else None
            windows.append(window)
        states = [segment.policy_state for segment in prefilled.segments]
        self.requests[row] = SlotRequest(prompt, self.budget(prompt), states, windows)
        self.counters.start(prompt, 0, row=row)
        self.active[row] = 1

    def release(self, row: int) -> None:
        """Take slot ``row`` out of the decode steps; its rows are free for the next request."""
        self.requests[row] = None
        self.active[row] = 0
        self.counters.start(self.capacity - 1, 0, row=row)
        for picks in self._picks:
            if picks is not None:
                picks.keep[row] = False
                picks.counts[row] = 0

    def prefix(self, count: int) -> SlotCache:
        """The first ``count`` slots as a slot cache of their own, over the same memory: a step through
        it computes ``count`` rows. Requests take the lowest free slots, so the idle slots past the
        last busy one need not be computed at all. Build it again when the layout changes."""
        if count == self.rows:
            self._prefix = None
            return self
        view = copy.copy(self)
        view.rows = count
        view.layers = [copy.copy(layer) for layer in self.layers]
        for part in view.layers:
            if isinstance(part, DenseLayerKV):
                part.key_buffer, part.value_buffer = part.key_buffer[:count], part.value_buffer[:count]
                part.refresh_views()
        view.segments = [copy.copy(segment) for segment in self.segments]
        for part in view.segments:
            part.selection = part.selection_valid = part.staging = None  # the view's own, [count, k]
            if part.arena is not None:
                part.arena, part.ring = part.arena.rows_view(0, count), part.ring[:count]
        view.counters = self.counters.prefix(count)
        view.valid, view.selectable = self.valid[:count], self.selectable[:count]
        view._columns, view.active = self._columns[:count], self.active[:count]
        view.requests = self.requests[:count]
        view._picks = [None] * len(self.segments)
        view._prefix = None
        self._prefix = view  # its selection buffers count in tier_bytes
        return view

    def busy_prefix(self) -> int:
        """Slots up to and including the last busy one."""
        return max((row + 1 for row, request in enumerate(self.requests) if request is not None), default=0)

    def layout(self) -> tuple:
        """What a recorded step depends on: each slot's context and budget (None: idle)."""
        return tuple(None if r is None else (r.context, r.budget) for r in self.requests)

    def free_rows(self) -> list[int]:
        return [row for row, request in enumerate(self.requests) if request is None]

    def used_host_bytes(self) -> int:
        """Host-tier bytes holding the prompts of the requests in the slots."""
        per_token = sum(s.arena.fetch_row_bytes for s in self.segments if s.arena is not None)
        return per_token * sum(r.context for r in self.requests if r is not None)

    # the decode step ------------------------------------------------------------------------
    def _begin_forward(self, like: torch.Tensor) -> None:
        counters = self.counters
        counters.steps.mul_(self.active)  # idle slots stay at their scratch column
        counters.advance(self.ring_tokens)
        counters.length.mul_(self.active).add_(1 - self.active)  # an idle slot attends to one column
        torch.lt(self._columns, counters.context_len[:, None], out=self.selectable)

    def select(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """Each busy slot's selection, made as its request alone would make it, padded to the longest."""
        segment = self.segments[self.plan.segment_of[layer_idx]]
        keys = self.layers[layer_idx].key_buffer
        chosen: list[tuple[int, torch.Tensor]] = []
        for row, request in enumerate(self.requests):
            if request is None:
                continue
            position = self.counters.position[row : row + 1]
            window = request.windows[segment.index] if request.windows else None
            if window is not None:
                window.push(query[row : row + 1], position)
                queries, positions = window.queries, window.positions
            else:
                queries, positions = query[row : row + 1], position
            context = SelectionContext(
                queries=queries,
                query_positions=positions,
                keys=keys[row : row + 1, :, : request.context],
                valid=self.selectable[row : row + 1, : request.context],
                budget=min(request.budget, request.context),
                scaling=scaling,
                layer=layer_idx,
                state=request.states[segment.index],
                rope_inv_freq=self.rope_inv_freq,
            )
            chosen.append((row, self.policy.select(context)))
        width = max((indices.shape[1] for _, indices in chosen), default=1)
        picks = self._pick_buffers(segment.index, width, query.device)
        for row, picked in chosen:
            count = picked.shape[1]
            picks.indices[row, :count].copy_(picked[0])
            if picks.counts[row] != count:  # changes only with the layout: not part of every step
                picks.keep[row, :count].fill_(True)
                picks.keep[row, count:].fill_(False)
                picks.counts[row] = count
        segment.set_selection(picks.indices, self.selectable, self.transfer)
        segment.selection_valid.logical_and_(picks.keep)
        return picks.indices

    def _pick_buffers(self, segment: int, width: int, device: torch.device) -> _Picks:
        """The segment's padded selection ``[rows, width]``, allocated again when the width changes."""
        picks = self._picks[segment]
        if picks is None or picks.indices.shape[1] != width:
            picks = _Picks(
                torch.zeros(self.rows, width, dtype=torch.long, device=device),
                torch.zeros(self.rows, width, dtype=torch.bool, device=device),
                [0] * self.rows,
            )
            self._picks[segment] = picks
        return picks

    # what OmniKVCache does for one generate call, and a slot cache does not -----------------------
    def ensure_room(self, like: torch.Tensor, steps: int = 1) -> None:
        """Fixed capacity: admission keeps every request inside it."""

    def start_decoding(self, like: torch.Tensor) -> None:
        """Always decoding."""

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest slot's columns (transformers asks; each slot keeps its own on the device)."""
        return max((r.context for r in self.requests if r is not None), default=0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a slot cache's rows are separate requests: beam search does not apply")

    batch_select_indices = reorder_cache

    def tier_bytes(self) -> dict[str, int]:
        """Bytes per tier (allocated for every slot), with the host bytes the busy slots' prompts use."""
        tiers = super().tier_bytes()
        tiers["host"] = self.used_host_bytes()
        if self._prefix is not None:
            tiers["gpu_selected"] += sum(segment.gpu_bytes()["selected"] for segment in self._prefix.segments)
        return tiers

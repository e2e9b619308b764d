"""A cache whose batch rows are independent requests: the server's continuous batch.

An :class:`~omnikv_runtime.cache.adapter.OmniKVCache` serves one ``generate`` call: its rows share
their columns (padding keeps them aligned) and the tiers grow with the request. A :class:`SlotCache`
is built over the same parts (:class:`~omnikv_runtime.cache.tiers.Tiers` allocated once, at a fixed
number of rows (slots) and a fixed capacity per row, and the engine's
:class:`~omnikv_runtime.cache.selector.Selector`), and each slot holds its own request:

- A request is **prefilled alone** through :meth:`SlotCache.row_cache`, an ordinary batch-1
  ``OmniKVCache`` over a view of the slot's rows of the tiers. The prefill writes the slot's dense
  buffers and host-tier rows in place (nothing is copied afterwards), in chunks, between decode
  steps of the others.
- :meth:`SlotCache.activate` then lets the slot join the decode steps; :meth:`SlotCache.release`
  takes it out. Its rows are reused by the next request (its hot-cache rows are emptied).
- Each row decodes at its own position (the device counters are per row), so rows that joined at
  different times share one static step. An idle slot writes into a scratch column (the row's
  last) and attends to one column, so it costs almost nothing and disturbs no prefill.
- The filter layers select **per row**, exactly as the request alone would: the selector sees the
  row's own context width, budget, query window and state (batch-1 slices). The rows' selections
  are padded to the longest and the padding is masked out of attention (and of the hot cache).
  The shapes of a step therefore change when a request joins or leaves: :meth:`SlotCache.layout`
  says what a recorded step depends on, so a step runner keeps one recording per layout.
- With tensor parallelism every rank holds its own heads of every slot, and the selector's rank
  group makes every rank select the same tokens, as in ``generate``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache

from omnikv_runtime.cache.adapter import OmniKVCache, head_major, leave_note
from omnikv_runtime.cache.counters import DecodeCounters, QueryWindow
from omnikv_runtime.cache.selector import Selector
from omnikv_runtime.cache.tiers import Tiers
from omnikv_runtime.listeners import Listeners

logger = logging.getLogger(__name__)


@dataclass
class SlotRequest:
    """What a slot's filter layers need to select for its request as if it ran alone."""

    context: int  # prompt tokens: the selectable context
    token_budget: int  # tokens a sparse layer sees
    states: list[dict[str, Any]]  # per segment: the policy's per-request state
    windows: list[QueryWindow | None] = field(default_factory=list)  # per segment (query windows > 1)


class SlotCache(Cache):
    """``rows`` slots of ``capacity`` columns each (see the module docstring).

    Args:
        tiers: unallocated tiers of ``reserve_tokens = capacity`` (this cache allocates them).
        selector: the filter layers' policy call (with the engine's rank group and listeners).
        token_budget_for: maps a context length to the number of tokens a sparse layer sees.
        rows: slots (the batch of every decode step).
        capacity: columns per slot; a request's prompt and new tokens must fit in ``capacity - 1``
            (the last column is the idle slots' scratch).
        new_tokens: tail-ring slots (tokens a request generates at most, unless ``tail_tokens``
            bounds the ring and lets older generated tokens join the selectable context).
        kv_heads, head_dim, dtype, device: the KV geometry (this rank's heads).
        tail_tokens: ``omnikv.tail_tokens`` (None: every generated token stays in the ring).
        fused_layers: decoder layers given the fused forward run it for this cache.
    """

    def __init__(
        self,
        tiers: Tiers,
        selector: Selector,
        token_budget_for: Callable[[int], int],
        rows: int,
        capacity: int,
        new_tokens: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        tail_tokens: int | None = None,
        fused_layers: bool = False,
        listeners: Listeners | None = None,
    ) -> None:
        super().__init__(layers=tiers.layers)
        self.tiers, self.selector, self.token_budget_for = tiers, selector, token_budget_for
        self.plan = tiers.plan
        self.rows, self.capacity = rows, capacity
        self.tail_tokens, self.fused_layers = tail_tokens, fused_layers
        self.listeners = listeners if listeners is not None else Listeners()
        self.ring_tokens = tail_tokens or max(new_tokens, 1)
        tiers.allocate(rows, capacity, self.ring_tokens, kv_heads, head_dim, dtype, device)
        self.counters = DecodeCounters(rows, device)
        self.active = torch.zeros(rows, dtype=torch.long, device=device)  # 1 where a request decodes
        self.requests: list[SlotRequest | None] = [None] * rows
        size = selector.window_size
        # per segment, per slot: the query window each request's selections read (kept by the slot)
        self.windows = [[QueryWindow(size) for _ in range(rows)] if size > 1 else [] for _ in tiers.segments]
        self._picks: list[dict[str, torch.Tensor]] = [{} for _ in tiers.segments]  # flat padded selections
        self._prefix: SlotCache | None = None  # the latest prefix view, with selection buffers of its own
        # selection buffers at the widest a request can select: they never grow, so no recording goes stale
        widest = min(token_budget_for(capacity), capacity)
        for segment in tiers.segments:
            segment.reserve_selection(rows, widest, device)
            self._pick_views(segment.index, widest, device)
        for row in range(rows):
            self.counters.start(capacity - 1, 0, row=row)  # idle: the scratch column

    # slots --------------------------------------------------------------------------------------
    def row_cache(self, row: int, prompt_tokens: int) -> OmniKVCache:
        """A batch-1 cache over slot ``row``'s memory: prefill the request through it."""
        if self.requests[row] is not None:
            raise RuntimeError(f"slot {row} is busy")
        return OmniKVCache(
            self.tiers.rows_view(row, row + 1),
            self.selector,
            self.token_budget_for,
            prompt_tokens=prompt_tokens,
            tail_tokens=self.tail_tokens,
            fused_layers=self.fused_layers,
            listeners=self.listeners,
        )

    def activate(self, row: int, prefilled: OmniKVCache) -> None:
        """Let slot ``row`` decode the request just prefilled through its :meth:`row_cache`."""
        prompt = prefilled.get_seq_length()
        if prompt + 1 >= self.capacity:
            raise ValueError(f"a prompt of {prompt} tokens leaves no room in slots of {self.capacity} columns")
        for mine, theirs in zip(self.tiers.dense_layers, prefilled.tiers.dense_layers, strict=True):
            if theirs.key_buffer.data_ptr() != mine.key_buffer[row].data_ptr():
                raise RuntimeError(f"the prefill of slot {row} outgrew the slot's {self.capacity} columns")
        self.tiers.transfer.synchronize()  # the prefill's writes to the host tier have landed
        windows: list[QueryWindow | None] = []
        for index, segment in enumerate(prefilled.tiers.segments):
            window = None
            if self.windows[index] and segment.window.has_prefill:
                window = self.windows[index][row]
                window.take_prefill(segment.window)
            windows.append(window)
        states = [segment.policy_state for segment in prefilled.tiers.segments]
        self.requests[row] = SlotRequest(prompt, self.token_budget_for(prompt), states, windows)
        for hot in self.tiers.hot_caches:
            if hot is not None:
                hot.forget_rows(row, row + 1)  # the rows it held were the last request's tokens
        self.counters.start(prompt, 0, row=row)
        self.active[row] = 1

    def release(self, row: int) -> None:
        """Take slot ``row`` out of the decode steps; its rows are free for the next request."""
        self.requests[row] = None
        self.active[row] = 0
        self.counters.start(self.capacity - 1, 0, row=row)

    def prefix(self, count: int) -> SlotCache:
        """The first ``count`` slots as a slot cache of their own, over the same memory: a step through
        it computes ``count`` rows. Requests take the lowest free slots, so the idle slots past the
        last busy one need not be computed at all. Build it again when the layout changes."""
        if count == self.rows:
            self._prefix = None
            return self
        view = SlotCache.__new__(SlotCache)
        view.__dict__.update(self.__dict__)
        view.tiers = self.tiers.rows_view(0, count)
        view.layers = view.tiers.layers
        view.rows = count
        view.counters = self.counters.prefix(count)
        view.active = self.active[:count]
        view.requests = self.requests[:count]
        view.windows = [rows[:count] for rows in self.windows]
        view._picks = [{} for _ in self.tiers.segments]
        view._prefix = None
        self._prefix = view  # its selection buffers count in tier_bytes
        return view

    def busy_prefix(self) -> int:
        """Slots up to and including the last busy one."""
        return max((row + 1 for row, request in enumerate(self.requests) if request is not None), default=0)

    def layout(self) -> tuple:
        """What a recorded step depends on: each slot's context and budget (None: idle)."""
        return tuple(None if r is None else (r.context, r.token_budget) for r in self.requests)

    def free_rows(self) -> list[int]:
        return [row for row, request in enumerate(self.requests) if request is None]

    def used_host_bytes(self) -> int:
        """Host-tier bytes holding the prompts of the requests in the slots."""
        per_token = sum(arena.fetch_row_bytes for arena in self.tiers.arenas if arena is not None)
        return per_token * sum(r.context for r in self.requests if r is not None)

    # the decode step ------------------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            counters = self.counters
            counters.steps.mul_(self.active)  # idle slots stay at their scratch column
            counters.advance(self.ring_tokens)
            counters.length.mul_(self.active).add_(1 - self.active)  # an idle slot attends to one column
            self.tiers.update_selectable(counters)
        sources = self.tiers.decode_sources(layer_idx, key_states, value_states, self.counters)
        keys, values = head_major(sources)
        leave_note(self, layer_idx, keys, sources)
        return keys, values

    def head_max_buffer(self, layer_idx: int, query: torch.Tensor) -> torch.Tensor | None:
        """Where the filter layer's decode attention writes the policy's scores for every slot's columns, or
        None (see :meth:`Selector.head_max_buffer`)."""
        return self.selector.head_max_buffer(query, self.tiers.layers[layer_idx].key_buffer.shape[2])

    def select(
        self, layer_idx: int, query: torch.Tensor, scaling: float, head_max: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Each busy slot's selection, made as its request alone would make it, padded to the longest
        (``head_max``: the scores the decode attention wrote into :meth:`head_max_buffer`'s buffer, or None)."""
        segment = self.tiers.segments[self.plan.segment_of[layer_idx]]
        keys = self.tiers.layers[layer_idx].key_buffer
        selectable = self.tiers.selectable
        chosen: list[tuple[int, torch.Tensor]] = []
        for row, request in enumerate(self.requests):
            if request is None:
                continue
            indices, _ = self.selector.choose(
                self,
                -1,
                layer_idx,
                query[row : row + 1],
                self.counters.position[row : row + 1],
                keys[row : row + 1, :, : request.context],
                selectable[row : row + 1, : request.context],
                request.token_budget,
                scaling,
                request.states[segment.index],
                request.windows[segment.index] if request.windows else None,
                head_max[row : row + 1, : request.context] if head_max is not None else None,
            )
            chosen.append((row, indices))
        width = max((indices.shape[1] for _, indices in chosen), default=1)
        padded, keep = self._pick_views(segment.index, width, query.device)
        keep.zero_()  # written every step: a replayed step of this layout rewrites its own lanes
        for row, picked in chosen:
            padded[row, : picked.shape[1]].copy_(picked[0])
            keep[row, : picked.shape[1]].fill_(True)
        kept = sum(picked.shape[1] for _, picked in chosen)
        self.tiers.generation += self.selector.fetch(self, segment, padded, selectable, keep, kept)
        return padded

    def _pick_views(self, segment: int, width: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The segment's padded selection and its real entries ``[rows, width]``, views of flat buffers
        that only grow (recorded steps of other widths read the same memory)."""
        picks = self._picks[segment]
        needed = self.rows * width
        if "indices" not in picks or picks["indices"].numel() < needed:
            picks["indices"] = torch.zeros(needed, dtype=torch.long, device=device)
            picks["keep"] = torch.zeros(needed, dtype=torch.bool, device=device)
            self.tiers.generation += 1
        return picks["indices"][:needed].view(self.rows, width), picks["keep"][:needed].view(self.rows, width)

    # what transformers asks ----------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest slot's columns (transformers asks; each slot keeps its own on the device)."""
        return max((r.context for r in self.requests if r is not None), default=0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a slot cache's rows are separate requests: beam search does not apply")

    batch_select_indices = reorder_cache

    def tier_bytes(self) -> dict[str, int]:
        """Bytes per tier (allocated for every slot), with the host bytes the busy slots' prompts use."""
        tiers = self.tiers.tier_bytes()
        tiers["host"] = self.used_host_bytes()
        if self._prefix is not None:
            tiers["gpu_selected"] += sum(segment.gpu_bytes()["selected"] for segment in self._prefix.tiers.segments)
        return tiers

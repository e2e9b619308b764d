"""transformers' ``Cache`` over the tiers: what a model's attention talks to during ``generate``.

The model's attention modules call ``cache.update(k, v, layer_idx)`` and then the registered
``"omnikv"`` attention function. ``update`` stores the new KV in the tiers (:class:`~omnikv_runtime.cache.tiers.Tiers`)
and leaves a note (:class:`AttentionNote`) that the attention function picks up on the same thread.

**Prefill** (more than one query, or a cache still short of ``prompt_tokens``) appends to growing
tiers. A dense layer attends through the model's own attention implementation and mask; a sparse
layer's chunk after the first attends to its earlier tokens read back from the host tier in
blocks (the note's ``earlier``; see :mod:`omnikv_runtime.cache.prefill_blocks`).

**Decode** is static: every buffer a step touches exists before the step, the step's position
lives in device counters (:class:`~omnikv_runtime.cache.counters.DecodeCounters`), and ``update``
writes at that position and hands the attention function :class:`~omnikv_runtime.kernels.KVSource`
descriptions of what to read. A filter layer's attention then scores the context and calls
:meth:`OmniKVCache.select`, which asks the :class:`~omnikv_runtime.cache.selector.Selector` for
the segment's tokens and starts their fetch. Nothing in a step reads a value back to the host or
depends on one that changes, so the same code runs step by step under ``model.generate`` and is
recorded once in a CUDA graph by the engine's decode loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache

from omnikv_runtime.cache.counters import DecodeCounters
from omnikv_runtime.cache.prefill_blocks import EarlierKV
from omnikv_runtime.cache.selector import Selector
from omnikv_runtime.cache.tiers import Tiers
from omnikv_runtime.kernels import KVSource
from omnikv_runtime.layout import tail_ring_tokens
from omnikv_runtime.listeners import Listeners, is_recording

_NOTES = threading.local()


@dataclass
class AttentionNote:
    """What ``update`` tells the attention function that runs right after it."""

    cache: Any  # the cache whose update left it (a generate call's, or a server's slots)
    layer_idx: int
    keys: torch.Tensor  # the tensor update returned (identity proves the note is current)
    sources: list[KVSource] | None  # decode: what this layer attends to; None during prefill
    earlier: EarlierKV | None = None  # prefill: a sparse layer's earlier tokens, not in ``keys``


def leave_note(
    cache: Any, layer_idx: int, keys: torch.Tensor, sources: list[KVSource] | None, earlier: EarlierKV | None = None
) -> None:
    """Tell the attention function that runs next on this thread what ``update`` stored."""
    _NOTES.note = AttentionNote(cache, layer_idx, keys, sources, earlier)


def take_note(layer_idx: int, keys: torch.Tensor) -> AttentionNote | None:
    """The note left by this layer's ``update`` for exactly these keys, or None (no OmniKV cache)."""
    note = getattr(_NOTES, "note", None)
    _NOTES.note = None
    if note is None or note.layer_idx != layer_idx or note.keys is not keys:
        return None
    return note


def head_major(sources: list[KVSource]) -> tuple[torch.Tensor, torch.Tensor]:
    """What HF's attention module passes on from a decode update: the first source, head-major."""
    return sources[0].keys.transpose(1, 2), sources[0].values.transpose(1, 2)


class OmniKVCache(Cache):
    """The tiered cache of one ``generate`` call: its rows share their columns (padding aligns them).

    Args:
        tiers: the buffers (their layers are this cache's layers).
        selector: the filter layers' policy call.
        token_budget_for: maps a context length to the number of tokens a sparse layer sees.
        prompt_tokens: length of the prompt (padded), when known. A one-token forward is decode only
            once this many tokens are in the cache, so a chunked prefill whose last chunk is a single
            token stays a prefill. Without it, every one-token forward after the first is decode.
        tail_tokens: slots of the tail ring (generated tokens every sparse layer sees); older
            generated tokens join the selectable context. None: every generated token stays in
            the tail (the ring starts at the reserve's new tokens and grows if a run goes past them).
        fused_layers: decoder layers given the fused forward run it for this cache.
        listeners: the engine's observers (events only in eager steps, never while a step records).
    """

    def __init__(
        self,
        tiers: Tiers,
        selector: Selector,
        token_budget_for: Callable[[int], int],
        prompt_tokens: int = 0,
        tail_tokens: int | None = None,
        fused_layers: bool = False,
        listeners: Listeners | None = None,
    ) -> None:
        super().__init__(layers=tiers.layers)
        self.tiers = tiers
        self.selector = selector
        self.plan = tiers.plan
        self.token_budget_for = token_budget_for
        self.prompt_tokens = prompt_tokens
        self.tail_tokens = tail_tokens
        self.fused_layers = fused_layers
        self.listeners = listeners if listeners is not None else Listeners()
        self.context_len = 0  # tokens a filter layer may select from at the last prefill
        self.decoding = False
        self.decode_steps = 0  # tokens decoded since the last prefill (host-side count)
        self.ring_tokens = 0  # slots of the tail rings
        self.token_budget = 0  # rows a sparse layer sees, fixed at the start of decoding
        self.counters: DecodeCounters | None = None
        self.prompt_valid: torch.Tensor | None = None  # [batch, columns] from the prefill's mask
        # per decode step: filter layer -> tokens selected (the runtime's own account; a step runner
        # adds the steps it replayed)
        self.selected_log: list[dict[int, int]] = []

    def expect_prompt(self, tokens: int) -> None:
        """The prompt being prefilled has at least ``tokens`` tokens: until the cache holds them, a
        one-token forward is a prefill chunk, not a decode step."""
        self.prompt_tokens = max(self.prompt_tokens, tokens)

    # transformers' entry point -------------------------------------------------------------
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx == 0:
            self.begin_forward(key_states)
        sources = earlier = None
        if self.decoding:
            sources = self.tiers.decode_sources(layer_idx, key_states, value_states, self.counters)
            keys, values = head_major(sources)
        else:
            keys, values = self.tiers.store(layer_idx, key_states, value_states)
            earlier = self.tiers.layers[layer_idx].earlier
        leave_note(self, layer_idx, keys, sources, earlier)
        return keys, values

    def begin_forward(self, like: torch.Tensor) -> None:
        """A forward of ``like.shape[2]`` tokens per row begins: decide whether it is a decode step or
        a prefill chunk, and prepare for it (the first layer's ``update`` calls this)."""
        past = self.get_seq_length()
        new = like.shape[2]
        was_decoding = self.decoding
        self.decoding = new == 1 and past > 0 and past >= self.prompt_tokens
        if not self.decoding:  # prefill (or a new turn): every token so far becomes selectable context
            self.context_len = past + new
            self.decode_steps = 0
            self.tiers.transfer.discard_prefetches()
            self.tiers.prefetch_after(-1)
        else:
            if not was_decoding or self.counters is None:
                self._start_decode(like)
            self.ensure_room(like)
            self.counters.advance(self.ring_tokens)
            self.tiers.update_selectable(self.counters)
            if not is_recording():
                self.advance_host(1)
        self.listeners.announce_forward_start(self, self.decoding, new, past)

    def _start_decode(self, like: torch.Tensor) -> None:
        """Point the device counters at the first step and set the decode phase's budget and ring."""
        past = self.get_seq_length()
        batch = like.shape[0]
        if self.counters is None or self.counters.batch != batch:
            self.counters = DecodeCounters(batch, like.device)
        self.counters.start(past)
        self.token_budget = self.token_budget_for(self.context_len)
        self.ring_tokens = tail_ring_tokens(self.tail_tokens, self.tiers.reserve_tokens, past)
        prompt_valid = self.prompt_valid
        if prompt_valid is None or prompt_valid.shape[0] != batch:
            prompt_valid = torch.ones(batch, past, dtype=torch.bool, device=like.device)
        self.prompt_valid = prompt_valid[:, :past].to(like.device)
        self.tiers.start_decode(self.prompt_valid)
        for segment in self.tiers.segments:  # at the phase's width now: no step replaces them
            if segment.arena is not None:
                width = min(self.token_budget, self.context_len)
                self.tiers.generation += segment.reserve_selection(batch, max(width, 1), like.device)

    def ensure_room(self, like: torch.Tensor, steps: int = 1) -> None:
        """Make room for ``steps`` more decode steps now (buffers grow, at least doubling). A decode
        loop calls it before recording a step: a replay keeps the buffers it was recorded with."""
        if self.tail_tokens is None and self.decode_steps + steps > self.ring_tokens:  # every generated token stays
            self.ring_tokens = max(2 * self.ring_tokens, self.decode_steps + steps)
        self.tiers.ensure_room(like, self.get_seq_length() + steps, self.ring_tokens, self.prompt_valid)

    def start_decoding(self, like: torch.Tensor) -> None:
        """Enter decoding now (after a prefill), so that the first step may be a replayed graph."""
        self.decoding = True
        self._start_decode(like)
        self.ensure_room(like)

    def reset(self) -> None:
        """Forget the request; keep every buffer, so that a recorded decode step can serve the next
        request of the same shape (its prefill writes into the same tiers)."""
        self.tiers.forget()
        self.context_len = self.decode_steps = 0
        self.decoding = False
        self.prompt_valid = None
        self.selected_log.clear()

    def advance_host(self, steps: int) -> None:
        """Move the host-side counts forward by ``steps`` decoded tokens (eager steps do this
        themselves; a step runner calls it for the steps it replayed)."""
        self.tiers.advance(steps)
        self.decode_steps += steps
        self.selected_log.extend({} for _ in range(steps))

    # called by the attention function ------------------------------------------------------------
    def record_prompt_mask(self, valid: torch.Tensor) -> None:
        """Prefill: which of the columns so far are real tokens, ``[batch, columns]`` bool."""
        self.prompt_valid = valid

    def remember_queries(self, layer_idx: int, queries: torch.Tensor) -> None:
        """Prefill: keep the filter layer's last ``window_size`` queries (oldest first)."""
        if self.selector.window_size <= 1:
            return  # decode scores with the step's own query
        end = self.get_seq_length()  # update already counted this forward's tokens
        positions = torch.arange(end - queries.shape[2], end, device=queries.device)
        self.tiers.segments[self.plan.segment_of[layer_idx]].window.extend(queries, positions)

    def selectable_width(self) -> int:
        """The columns a filter layer scores: the prompt, unless a bounded tail ring lets generated tokens join
        the selectable context; then it grows each step, and the policy sees every column with the rest masked."""
        return self.tiers.selectable.shape[1] if self.tail_tokens else self.context_len

    def head_max_buffer(self, layer_idx: int, query: torch.Tensor) -> torch.Tensor | None:
        """Where the filter layer's decode attention writes the policy's scores, or None (see
        :meth:`Selector.head_max_buffer`)."""
        return self.selector.head_max_buffer(query, self.selectable_width())

    def select(
        self, layer_idx: int, query: torch.Tensor, scaling: float, head_max: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Decode: choose the filter layer's segment's tokens and start fetching their rows (``head_max``: the
        scores the decode attention wrote into :meth:`head_max_buffer`'s buffer, or None)."""
        segment = self.tiers.segments[self.plan.segment_of[layer_idx]]
        selectable = self.tiers.selectable
        width = self.selectable_width()
        keys = self.tiers.layers[layer_idx].key_buffer[:, :, :width]
        indices, _ = self.selector.choose(
            self,
            self.decode_steps - 1,
            layer_idx,
            query,
            self.counters.position[:1],  # the rows of one generate call share their columns
            keys,
            selectable[:, :width],
            self.token_budget,
            scaling,
            segment.policy_state,
            segment.window if self.selector.window_size > 1 else None,
            head_max,
        )
        if not is_recording():
            self.selected_log[-1][layer_idx] = indices.shape[1]
        self.tiers.generation += self.selector.fetch(self, segment, indices, selectable)
        return indices

    # reporting ------------------------------------------------------------------------------
    def policy_states(self) -> dict[int, dict]:
        """Filter layer -> the selection policy's per-request state for it."""
        return {segment.filter_layer: segment.policy_state for segment in self.tiers.segments}

    def tier_bytes(self) -> dict[str, int]:
        """Bytes allocated per tier (see :meth:`Tiers.tier_bytes`)."""
        return self.tiers.tier_bytes()

    def hot_counters(self) -> dict[str, int]:
        return self.tiers.hot_counters()

    @property
    def hot_cache_tokens(self) -> int:
        return self.tiers.hot_cache_tokens

    # transformers' batch bookkeeping ----------------------------------------------------------
    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.tiers.select_batch(beam_idx)
        if self.prompt_valid is not None:
            self.prompt_valid = self.prompt_valid.index_select(0, beam_idx.to(self.prompt_valid.device))

    batch_select_indices = reorder_cache

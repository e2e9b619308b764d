"""The GPU hot cache of one segment: recently fetched host rows, so a step fetches only the new ones.

OmniKV's selections overlap heavily from one step to the next (40-72% of a filter layer's
selection repeats on the bundled model, 3K-token prompts). A segment's hot cache keeps ``slots``
packed rows (the same ``[layers, 2, kv_heads, head_dim]`` rows as the host arena) on the compute
device. For each step's selection, :meth:`HotCache.plan` decides per selected token where its row comes from:

- a **hit** reads the row from its hot slot;
- a **miss** reads it from the host arena and, if the eviction policy frees a slot, also stores
  it there (delta fetch: only misses cross PCIe).

All bookkeeping is in device tensors of fixed shape (``[batch, k]`` lanes, ``[batch, slots + 1]``
slot state, ``[batch, tokens + 1]`` token map; the extra column is a scratch target for lanes that
write nothing), so a step has no host synchronisation and no data-dependent shapes. Hits and
misses accumulate in device counters read only when stats are asked for.
"""

from __future__ import annotations

import torch

from omnikv_runtime.policies.eviction_base import EvictionPolicy


class HotCache:
    """Per-segment GPU cache of host rows with a pluggable eviction policy."""

    def __init__(
        self,
        policy: EvictionPolicy,
        batch: int,
        slots: int,
        row_shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device,
        token_capacity: int,
        host_row_bytes: int | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"a hot cache needs at least one slot, got {slots}")
        self.policy = policy
        self.slots = slots
        self.row_shape = tuple(row_shape)
        self.device = torch.device(device)
        self.data = torch.empty((batch, slots + 1, *row_shape), dtype=dtype, device=device)  # + scratch row
        self.token_of_slot = torch.full((batch, slots + 1), -1, dtype=torch.long, device=device)
        self.slot_of_token = torch.full((batch, token_capacity + 1), -1, dtype=torch.long, device=device)
        self.state = policy.init_state(batch, slots + 1, self.device)
        self.host_rows: torch.Tensor | None = None  # plan's outputs, [batch, k]
        self.hot_slots: torch.Tensor | None = None
        # bytes one row takes in the host tier (a miss moves them): less than a hot row for an FP8 tier
        self.host_row_bytes = host_row_bytes if host_row_bytes is not None else self.row_bytes
        self.hits = torch.zeros((), dtype=torch.long, device=device)
        self.misses = torch.zeros((), dtype=torch.long, device=device)
        self.lanes: torch.Tensor | None = None  # [batch, k] bool: the real lanes of a padded selection

    def rows_view(self, start: int, stop: int) -> HotCache:
        """This cache's batch rows ``start..stop`` (same memory: what one changes, the other sees)."""
        view = object.__new__(HotCache)
        view.__dict__.update(self.__dict__)
        for name in ("data", "token_of_slot", "slot_of_token"):
            setattr(view, name, getattr(self, name)[start:stop])
        view.state = {name: value[start:stop] if value.dim() == 2 else value for name, value in self.state.items()}
        view.host_rows = view.hot_slots = view.lanes = None
        return view

    def use_outputs(self, host_rows: torch.Tensor, hot_slots: torch.Tensor) -> None:
        """Write :meth:`plan`'s outputs into these ``[batch, k]`` int64 buffers (its owner keeps them
        at fixed addresses, so recorded steps of several widths can be replayed)."""
        self.host_rows, self.hot_slots = host_rows, hot_slots

    def set_lanes(self, lanes: torch.Tensor | None) -> None:
        """Mark the padding of the selections :meth:`plan` will see: lanes where ``lanes`` is False read
        the scratch row and change nothing (None: every lane is real). The tensor is read at each plan,
        so a recorded step sees what is written into it later."""
        self.lanes = lanes

    def forget_rows(self, start: int, stop: int) -> None:
        """Empty batch rows ``start..stop`` (a new request takes them: its host rows are other tokens)."""
        self.token_of_slot[start:stop].fill_(-1)
        self.slot_of_token[start:stop].fill_(-1)
        fresh = self.policy.init_state(stop - start, self.slots + 1, self.device)
        for name, value in fresh.items():
            if value.dim() == 2:
                self.state[name][start:stop].copy_(value)

    @property
    def row_bytes(self) -> int:
        """Bytes of one packed row (every layer of the segment, keys and values)."""
        return self.data[0, 0].numel() * self.data.element_size()

    def nbytes(self) -> int:
        tensors = (self.data, self.token_of_slot, self.slot_of_token)
        return sum(t.numel() * t.element_size() for t in tensors)

    def ensure_tokens(self, tokens: int) -> None:
        """Grow the token map when the host arena grew (rare: only past the reserved capacity)."""
        have = self.slot_of_token.shape[1] - 1
        if tokens <= have:
            return
        grown = torch.full((self.slot_of_token.shape[0], max(tokens, 2 * have) + 1), -1, dtype=torch.long)
        grown = grown.to(self.device)
        grown[:, :have].copy_(self.slot_of_token[:, :have])
        self.slot_of_token = grown

    def plan(self, indices: torch.Tensor, token_capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where each selected row comes from this step, updating the bookkeeping.

        Args:
            indices: ``[batch, k]`` selected token indices (distinct per batch row), on the device.
            token_capacity: tokens the host arena can hold (sizes the token map).

        Returns:
            ``host_rows`` ``[batch, k]``: the token to read from the host arena, or -1 for a hit;
            ``hot_slots`` ``[batch, k]``: the slot a hit reads or a miss fills, or ``slots`` (the
            scratch row) for a miss that is not cached.
        """
        self.ensure_tokens(token_capacity)
        scratch = self.slots
        indices = indices.to(self.device, torch.long)
        k = indices.shape[1]
        slot = self.slot_of_token.gather(1, indices)
        hit = slot >= 0
        miss = ~hit
        real = None
        if self.lanes is not None:  # padding lanes are neither hits nor misses
            real = self.lanes
            hit, miss = hit & real, miss & real

        priority = self.policy.priority(self.state).clone()
        priority = priority.masked_fill(self.token_of_slot < 0, float("-inf"))  # empty slots go first
        priority.scatter_(1, torch.where(hit, slot, scratch), float("inf"))  # never evict a row in use
        victims_count = min(k, self.slots)
        victim_priority, victims = torch.topk(priority[:, :scratch], victims_count, dim=1, largest=False)
        misses_so_far = torch.cumsum(miss, dim=1)  # the j-th miss of a row takes the j-th victim
        rank = (misses_so_far - 1).clamp(0, victims_count - 1)
        victim = victims.gather(1, rank)
        replaceable = victim_priority.gather(1, rank) < float("inf")
        cacheable = miss & (misses_so_far <= victims_count) & replaceable
        new_slot = torch.where(cacheable, victim, scratch)

        evicted = self.token_of_slot.gather(1, new_slot)
        token_scratch = self.slot_of_token.shape[1] - 1
        self.slot_of_token.scatter_(1, torch.where(cacheable & (evicted >= 0), evicted, token_scratch), -1)
        self.slot_of_token.scatter_(1, torch.where(cacheable, indices, token_scratch), new_slot)
        self.token_of_slot.scatter_(1, new_slot, torch.where(cacheable, indices, -1))

        hot_slots = torch.where(hit, slot, new_slot)
        self.policy.touch(self.state, hot_slots, cacheable)
        hit_count = hit.sum()
        self.hits += hit_count
        self.misses += miss.sum()
        # outputs in buffers of their own: a side stream reads them, so no temporary may be reused under it
        if self.host_rows is None or self.host_rows.shape != indices.shape:
            self.use_outputs(torch.empty_like(indices), torch.empty_like(indices))
        self.host_rows.copy_(torch.where(hit if real is None else hit | ~real, -1, indices))
        self.hot_slots.copy_(hot_slots)
        return self.host_rows, self.hot_slots

    def reset(self) -> None:
        """Empty, in place (a captured decode step keeps pointing at these tensors)."""
        self.token_of_slot.fill_(-1)
        self.slot_of_token.fill_(-1)
        fresh = self.policy.init_state(self.token_of_slot.shape[0], self.slots + 1, self.device)
        for name, value in fresh.items():
            self.state[name].copy_(value)
        self.hits.zero_()
        self.misses.zero_()

    def counters(self) -> dict[str, int]:
        """Hits, misses, bytes saved and bytes fetched (misses) so far, in the host tier's bytes; reads
        device counters, so call it outside the decode loop."""
        hits, misses = int(self.hits), int(self.misses)
        return {
            "hot_hits": hits,
            "hot_misses": misses,
            "hot_bytes_saved": hits * self.host_row_bytes,
            "hot_bytes_fetched": misses * self.host_row_bytes,
        }

    def select_batch(self, batch_index: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, as beam search asks."""
        batch_index = batch_index.to(self.device)
        self.data = self.data.index_select(0, batch_index)
        self.token_of_slot = self.token_of_slot.index_select(0, batch_index)
        self.slot_of_token = self.slot_of_token.index_select(0, batch_index)
        for name, value in self.state.items():
            if value.dim() == 2:
                self.state[name] = value.index_select(0, batch_index)

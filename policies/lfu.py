"""LFU eviction for the GPU hot cache: the row used least often since it was fetched leaves first.

Least-frequently-used replacement (Aho, Denning and Ullman, "Principles of optimal page
replacement", JACM 1971, analyse it). Suits selections with a stable core of heavy tokens
(sinks, the question) that recur every step while the rest churns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnikv_runtime.policies.lru import LRUEviction
from omnikv_runtime.policies.registry import register_eviction_policy


@register_eviction_policy
@dataclass
class LFUEviction(LRUEviction):
    """Evict the slot with the fewest uses since its row arrived; ties go to the older use (LRU's clock)."""

    name = "lfu"
    slot_state = {"uses": 0.0, "last_used": 0.0}

    def priority(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        # uses dominate; the last-use step (always < 2**20 apart here) breaks ties towards the older row
        return state["uses"] * 2.0**20 + state["last_used"]

    def touch(self, state: dict[str, torch.Tensor], slots: torch.Tensor, filled: torch.Tensor) -> None:
        super().touch(state, slots, filled)  # the step and the last use
        uses = state["uses"]
        uses.scatter_(1, slots, torch.where(filled, 1.0, uses.gather(1, slots) + 1.0))

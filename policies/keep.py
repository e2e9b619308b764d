"""No eviction (``none``): the hot cache keeps the first rows it fetched and never replaces them.

A baseline for the eviction policies (a static cache filled on first use, like the
"pinned hot set" of paging systems): once full, rows it does not hold are fetched every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnikv_runtime.policies.eviction_base import EvictionPolicy
from omnikv_runtime.policies.registry import register_eviction_policy


@register_eviction_policy
@dataclass
class NoEviction(EvictionPolicy):
    """Never evict: a filled slot keeps its row for the rest of the request (infinite priority)."""

    name = "none"
    slot_state = {"never": float("inf")}

    def priority(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return state["never"]

"""The eviction-policy interface: which rows leave a segment's GPU hot cache.

A segment's hot cache holds up to ``slots`` recently fetched token rows per batch row. Each decode
step the cache asks its eviction policy for a priority per slot (lower leaves first), then tells
it which slots were used (hits) and which were refilled (misses). Everything stays in device
tensors of fixed shape, so a step never synchronises with the host and can be graph-captured.
A policy never sees the cache or the KV, only slot bookkeeping.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from omnikv_runtime.policies.params import check_fields


@dataclass
class EvictionPolicy(ABC):
    """Base class. Subclasses keep per-slot state in tensors and implement :meth:`priority`.

    Like a selection policy, an eviction policy is a dataclass whose fields are its parameters (a
    config's ``offload.eviction`` keys other than ``type``). A filled slot whose priority is
    ``+inf`` is never replaced (``none`` does that for every slot): misses that find no replaceable
    slot are fetched for this step only, not cached.
    """

    name: ClassVar[str] = "base"
    # the per-slot tensors (float32 ``[batch, columns]``) the policy keeps, with their starting value
    slot_state: ClassVar[dict[str, float]] = {}

    def __post_init__(self) -> None:
        check_fields(self)

    def init_state(self, batch: int, columns: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Fresh state for ``[batch, columns]`` slots. The last column is a scratch slot that absorbs
        the writes of rows that use no slot, so every update is a plain scatter of fixed shape."""
        state = {"step": torch.zeros((), dtype=torch.float32, device=device)}
        for name, value in self.slot_state.items():
            state[name] = torch.full((batch, columns), value, dtype=torch.float32, device=device)
        return state

    @abstractmethod
    def priority(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[batch, columns]`` float, lower leaves first; the caller overrides empty slots (first) and
        slots used this step (never)."""

    def touch(self, state: dict[str, torch.Tensor], slots: torch.Tensor, filled: torch.Tensor) -> None:
        """Record one step: ``slots`` ``[batch, k]`` is the slot each selected row read or filled (the
        scratch column for a row that used none), ``filled`` marks rows whose slot was just (re)filled."""
        state["step"] += 1

"""The eviction-policy interface: which rows leave a segment's GPU hot cache.

A segment's hot cache holds up to ``slots`` recently fetched token rows per batch row. Each decode
step the cache asks its eviction policy for a priority per slot (lower leaves first), then tells
it which slots were used (hits) and which were refilled (misses). Everything stays in device
tensors of fixed shape, so a step never synchronises with the host and can be graph-captured.
A policy never sees the cache or the KV, only slot bookkeeping.
"""

from __future__ import annotations

import torch


class EvictionPolicy:
    """Base class. Subclasses keep per-slot state in tensors and implement :meth:`priority`.

    A filled slot whose priority is ``+inf`` is never replaced (``none`` does that for every slot):
    misses that find no replaceable slot are fetched for this step only, not cached.
    """

    name = "base"

    def init_state(self, batch: int, slots: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Fresh per-slot state for a hot cache of ``[batch, slots]``."""
        return {"step": torch.zeros((), dtype=torch.float32, device=device)}

    def priority(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[batch, slots]`` float, lower leaves first; the caller overrides empty slots (first) and
        slots used this step (never)."""
        raise NotImplementedError

    def touch(
        self, state: dict[str, torch.Tensor], slots: torch.Tensor, used: torch.Tensor, filled: torch.Tensor
    ) -> None:
        """Record one step: ``slots`` ``[batch, k]`` slot per selected row (any value where ``used`` is False),
        ``used`` marks rows that read a slot this step, ``filled`` the subset that was just (re)filled."""
        state["step"] += 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

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

    def init_state(self, batch: int, columns: int, device: torch.device) -> dict[str, torch.Tensor]:
        """Fresh state for ``[batch, columns]`` slots. The last column is a scratch slot that absorbs
        the writes of rows that use no slot, so every update is a plain scatter of fixed shape."""
        return {"step": torch.zeros((), dtype=torch.float32, device=device)}

    def priority(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[batch, columns]`` float, lower leaves first; the caller overrides empty slots (first) and
        slots used this step (never)."""
        raise NotImplementedError

    def touch(self, state: dict[str, torch.Tensor], slots: torch.Tensor, filled: torch.Tensor) -> None:
        """Record one step: ``slots`` ``[batch, k]`` is the slot each selected row read or filled (the
        scratch column for a row that used none), ``filled`` marks rows whose slot was just (re)filled."""
        state["step"] += 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

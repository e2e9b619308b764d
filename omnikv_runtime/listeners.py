"""Observers of an engine: one listener interface for the profiler, benchmarks and tests.

Register a listener with ``engine.add_listener(listener)`` (or ``with engine.listening(listener):``)
and every cache the engine makes calls it:

- :meth:`EngineListener.forward_start`: a forward through the cache begins (prefill chunk or decode
  step; the cache has decided which);
- :meth:`EngineListener.selection`: a filter layer's policy chose tokens (the context it saw and
  the indices it returned);
- :meth:`EngineListener.fetch`: the chosen rows of that layer's segment were fetched (rows, bytes,
  wall time of the fetch).

Events are delivered only while the host runs the step (eager mode). A decode step replayed from a
CUDA graph runs no Python, so listeners see the prefill and the eager warm-up steps and none of the
replays; set ``generation.cuda_graphs`` to false to observe every step. Events may hold tensors of
the step; a listener that keeps them reads them back to the host itself. With no listener
registered the cache builds no event and reads no clock.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from omnikv_runtime.policies import SelectionContext


@dataclass(frozen=True)
class ForwardStart:
    """A forward through an OmniKV cache begins (sent from its first layer's cache update)."""

    cache: Any  # the OmniKVCache
    decoding: bool  # a decode step (one token per row after the prompt), else a prefill chunk
    tokens: int  # tokens per row in this forward
    past: int  # tokens already in the cache before it
    time: float  # time.perf_counter() at the start


@dataclass(frozen=True)
class Selection:
    """A filter layer's policy chose the tokens its segment's sparse layers read this step."""

    cache: Any
    layer: int  # the filter layer
    step: int  # decode step since the prompt (0 = the first)
    context: SelectionContext | None  # what the policy saw (None: a recorder that keeps no contexts)
    indices: torch.Tensor  # [batch, k] what it returned


@dataclass(frozen=True)
class Fetch:
    """The selected rows of a filter layer's segment were fetched from the host tier (or indexed in place)."""

    cache: Any
    layer: int  # the filter layer
    tokens: int  # rows per batch row
    bytes: int  # bytes the transfer engine moved for it
    start: float  # time.perf_counter() around the fetch
    end: float


def announce_forward(cache: Any, tokens: int, past: int) -> None:
    """Send a :class:`ForwardStart` to `cache`'s listeners (the cache calls this only when it has some)."""
    event = ForwardStart(cache, cache.decoding, tokens, past, time.perf_counter())
    for listener in cache.listeners:
        listener.forward_start(event)


def fetch_with_events(cache: Any, segment: Any, context: SelectionContext, indices: torch.Tensor) -> None:
    """The segment's fetch of the selected rows, with its :class:`Selection` before and :class:`Fetch` after
    (the cache calls this instead of the plain fetch only when it has listeners)."""
    selection = Selection(cache, context.layer, cache.decode_steps - 1, context, indices)
    for listener in cache.listeners:
        listener.selection(selection)
    fetched, start = cache.transfer.stats.bytes_fetched, time.perf_counter()
    segment.set_selection(indices, cache.selectable, cache.transfer)
    moved = cache.transfer.stats.bytes_fetched - fetched
    event = Fetch(cache, context.layer, indices.shape[1], moved, start, time.perf_counter())
    for listener in cache.listeners:
        listener.fetch(event)


class EngineListener:
    """Base class of engine observers: override the events you need; the others do nothing."""

    def forward_start(self, event: ForwardStart) -> None:
        """A forward through one of the engine's caches begins."""

    def selection(self, event: Selection) -> None:
        """A filter layer selected tokens."""

    def fetch(self, event: Fetch) -> None:
        """A filter layer's segment fetched its selected rows."""


class CacheRecorder(EngineListener):
    """Records the caches the engine's forwards run through (in order, each once)."""

    def __init__(self) -> None:
        self.caches: list[Any] = []

    def forward_start(self, event: ForwardStart) -> None:
        if not any(cache is event.cache for cache in self.caches):
            self.caches.append(event.cache)


class SelectionRecorder(EngineListener):
    """Records every selection event with copies of its tensors (the cache reuses its buffers).

    ``contexts=False`` keeps only the indices (the event's context is then None).
    """

    def __init__(self, contexts: bool = True) -> None:
        self.contexts = contexts
        self.records: list[Selection] = []

    def selection(self, event: Selection) -> None:
        context = None
        if self.contexts:
            context = dataclasses.replace(
                event.context,
                queries=event.context.queries.clone(),
                query_positions=event.context.query_positions.clone(),
                keys=event.context.keys.clone(),
                valid=event.context.valid.clone(),
            )
        self.records.append(dataclasses.replace(event, context=context, indices=event.indices.clone()))

"""Observers of an engine: one listener interface for the profiler, benchmarks and tests.

Register a listener with ``engine.add_listener(listener)`` (or ``with engine.listening(listener):``)
and every forward of the engine's model, and every cache the engine makes, calls it:

- :meth:`EngineListener.forward_start`: a forward through one of the engine's caches begins (prefill
  chunk or decode step; the cache has decided which);
- :meth:`EngineListener.selection`: a filter layer's policy chose tokens (the context it saw and
  the indices it returned);
- :meth:`EngineListener.fetch`: the chosen rows of that layer's segment were fetched (rows, bytes,
  wall time of the fetch);
- :meth:`EngineListener.forward_end`: a forward of the model returned (through one of the engine's
  caches, or without one: ``cache`` is then None). A listener may synchronize the device here.

**Nothing is delivered while a step is being recorded** (:func:`recording`, which the graphed
step holds around a CUDA graph capture): a recorded step runs its Python once, at recording time,
and never again, so its events would describe nothing that replays, and a listener that waits for
the device would break the capture. Replayed steps run no Python at all, so listeners see the
prefill and the eager steps, not the replays; set ``generation.cuda_graphs`` to false to observe
every step. Events may hold tensors of the step; a listener that keeps them reads them back to the
host itself. With no listener registered no event is built and no clock is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from omnikv_runtime.policies import SelectionContext

_STATE = threading.local()


@contextlib.contextmanager
def recording() -> Iterator[None]:
    """Mark this thread as recording a step (a CUDA graph capture, or the CPU stand-in of one)."""
    depth = getattr(_STATE, "recording", 0)
    _STATE.recording = depth + 1
    try:
        yield
    finally:
        _STATE.recording = depth


def is_recording() -> bool:
    """Whether this thread is recording a step: no host-side effect may happen now (no event, no
    clock, no count, no synchronisation)."""
    return getattr(_STATE, "recording", 0) > 0


@dataclass(frozen=True)
class ForwardStart:
    """A forward through an OmniKV cache begins (sent from its first layer's cache update)."""

    cache: Any  # the cache
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
    indices: torch.Tensor  # [rows, k] what it returned


@dataclass(frozen=True)
class Fetch:
    """The selected rows of a filter layer's segment were fetched from the host tier (or indexed in place)."""

    cache: Any
    layer: int  # the filter layer
    tokens: int  # rows per batch row
    bytes: int  # bytes the transfer engine moved for it
    start: float  # time.perf_counter() around the fetch
    end: float


@dataclass(frozen=True)
class ForwardEnd:
    """A forward of the engine's model returned."""

    cache: Any  # the engine's cache it ran through, or None (a forward without one)
    tokens: int  # tokens per row of its input
    start: float  # time.perf_counter() when the forward was called
    time: float  # time.perf_counter() when it returned


class EngineListener:
    """Base class of engine observers: override the events you need; the others do nothing."""

    def forward_start(self, event: ForwardStart) -> None:
        """A forward through one of the engine's caches begins."""

    def selection(self, event: Selection) -> None:
        """A filter layer selected tokens."""

    def fetch(self, event: Fetch) -> None:
        """A filter layer's segment fetched its selected rows."""

    def forward_end(self, event: ForwardEnd) -> None:
        """A forward of the engine's model returned."""


class Listeners(list):
    """An engine's listeners, shared with every cache it makes; the one place events are sent from.

    Each ``announce_*`` builds its event and reads the clock only when there is a listener and no
    step is being recorded.
    """

    @property
    def active(self) -> bool:
        return bool(self) and not is_recording()

    def announce_forward_start(self, cache: Any, decoding: bool, tokens: int, past: int) -> None:
        if self.active:
            event = ForwardStart(cache, decoding, tokens, past, time.perf_counter())
            for listener in list(self):
                listener.forward_start(event)

    def announce_forward_end(self, cache: Any, tokens: int, start: float) -> None:
        if self.active:
            event = ForwardEnd(cache, tokens, start, time.perf_counter())
            for listener in list(self):
                listener.forward_end(event)

    def announce_selection(self, cache: Any, step: int, context: SelectionContext, indices: torch.Tensor) -> None:
        if self.active:
            event = Selection(cache, context.layer, step, context, indices)
            for listener in list(self):
                listener.selection(event)

    def timed_fetch(self, cache: Any, layer: int, tokens: int, fetch: Callable[[], int]) -> None:
        """Run ``fetch`` (which returns the bytes it moved), timed into a :class:`Fetch` when anyone listens."""
        if not self.active:
            fetch()
            return
        start = time.perf_counter()
        moved = fetch()
        event = Fetch(cache, layer, tokens, moved, start, time.perf_counter())
        for listener in list(self):
            listener.fetch(event)


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

"""A step recorded once and replayed: one runner for the engine's decode loop and the server's batch.

A decode step is a few thousand small kernels; launched from Python they cost several times the
GPU's own time. :class:`GraphedStep` runs a step eagerly a few times (kernels compile, buffers take
their final sizes), records it in a CUDA graph, and from then on replays the recording. A step's
recording depends on the shapes and addresses it saw (the batch, the layout of a server's slots,
the buffers of the cache), so recordings are kept **per key**: a key seen before replays its kept
recording, a new key is warmed up and recorded. At most ``max_graphs`` are kept (the least recently
used goes first), and they share one memory pool, so what they hold beyond their graph objects is
one step's temporaries, not one per recording.

While a step records, :func:`~omnikv_runtime.listeners.recording` is held: observers are not
called and nothing synchronizes (a synchronisation would break the capture). A recording that
fails for any reason is logged, leaves the process usable (the CUDA generator is restored, the
streams are joined), and that key's step runs eagerly from then on.

The recorder is pluggable: :class:`CudaGraphRecorder` on CUDA; :class:`EagerRecorder`, a stand-in
that runs the step under the same recording mark instead of capturing it, lets a machine without
CUDA exercise the recording path (tests).
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from omnikv_runtime.listeners import recording
from omnikv_runtime.transfer import TransferEngine, TransferStats

logger = logging.getLogger(__name__)


def run_on_stream(stream: torch.cuda.Stream, step: Callable[[], None]) -> None:
    """Run ``step`` eagerly on ``stream``, ordered after and before the current stream's work (the
    warm-up torch asks for before recording on that stream)."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)


class CudaGraphRecorder:
    """Records steps in CUDA graphs on a side stream, all in one memory pool."""

    ran_while_recording = False  # a capture launches nothing: the step must be replayed once recorded

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(self.device)
        self.pool = torch.cuda.graph_pool_handle()
        self._caller = torch.cuda.current_stream(self.device)  # the stream current when a recording began

    def warm(self, step: Callable[[], None]) -> None:
        run_on_stream(self.stream, step)

    def record(self, step: Callable[[], None]) -> torch.cuda.CUDAGraph:
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        self._caller = torch.cuda.current_stream(self.device)
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            step()
        return graph

    def replay(self, graph: torch.cuda.CUDAGraph) -> None:
        graph.replay()

    def recover(self) -> None:
        """After a failed capture: the caller's stream is current again, the allocator stops filling the
        recordings' pool (a capture that fails to end leaves both as they were while it recorded) and later
        recordings go to a fresh pool, the default generator leaves its capture state, the streams join."""
        torch.cuda.set_stream(self._caller)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        try:  # a capture that fails to end leaves the allocator sending new blocks to the recordings' pool
            torch._C._cuda_endAllocateToPool(index, self.pool)
        except RuntimeError as exc:
            logger.debug("after the failed capture the allocator was not recording to its pool: %s", exc)
        # later recordings use a pool of their own: the allocator may still count the failed capture as
        # recording to the old one (seen on an H100 with torch 2.11), and would refuse to record there again;
        # the recordings kept so far keep their memory in the old pool
        self.pool = torch.cuda.graph_pool_handle()
        generator = torch.cuda.default_generators[index]
        fresh = torch.Generator(device=self.device)
        fresh.manual_seed(generator.initial_seed())
        generator.graphsafe_set_state(fresh)  # the capturing state object is dropped
        self._caller.wait_stream(self.stream)
        torch.cuda.synchronize(self.device)


class EagerRecorder:
    """A stand-in recorder for machines without CUDA: "recording" runs the step once under the
    recording mark (as a capture runs the step's Python), and each "replay" runs it again under
    the mark (as a replay runs no Python: no observer, no host-side count)."""

    ran_while_recording = True  # the step's work was done by the recording itself

    def warm(self, step: Callable[[], None]) -> None:
        step()

    def record(self, step: Callable[[], None]) -> Callable[[], None]:
        with recording():
            step()
        return step

    def replay(self, graph: Callable[[], None]) -> None:
        with recording():
            graph()

    def recover(self) -> None:
        return None


@dataclass
class Recorded:
    """A kept recording: the graph, what one replay moves, and what its owner noted about it."""

    graph: Any
    moved: TransferStats
    info: Any = None
    replays: int = 0


@dataclass
class StepTimes:
    """Wall seconds spent recording, and how many recordings and replays there were."""

    recording: float = 0.0
    recordings: int = 0
    replays: int = 0
    eager: int = 0
    failed: list[str] = field(default_factory=list)


class GraphedStep:
    """Runs a step: eagerly, or recorded per key and replayed (see the module docstring).

    Args:
        recorder: a :class:`CudaGraphRecorder`, an :class:`EagerRecorder`, or None (always eager).
        transfer: the transfer engine whose counters a replay adds (a replay runs no Python, so the
            counts one step adds are measured while it records).
        warmup: eager runs of a new key before it is recorded.
        max_graphs: recordings kept at most (least recently used first out).
        name: what the log calls the step.
    """

    def __init__(
        self,
        recorder: CudaGraphRecorder | EagerRecorder | None,
        transfer: TransferEngine,
        warmup: int = 1,
        max_graphs: int = 8,
        name: str = "decode step",
    ) -> None:
        self.recorder = recorder
        self.transfer = transfer
        self.warmup = warmup
        self.max_graphs = max(1, max_graphs)
        self.name = name
        self.times = StepTimes()
        self._kept: collections.OrderedDict[Hashable, Recorded] = collections.OrderedDict()
        self._warm: dict[Hashable, int] = {}
        self._eager_only: set[Hashable] = set()

    @property
    def enabled(self) -> bool:
        return self.recorder is not None

    @property
    def stream(self) -> torch.cuda.Stream | None:
        """The side stream steps are warmed and recorded on (CUDA only)."""
        return getattr(self.recorder, "stream", None)

    def kept(self) -> list[Hashable]:
        """Keys of the kept recordings, least recently used first."""
        return list(self._kept)

    def forget(self) -> None:
        """Drop every recording (their buffers are going away)."""
        self._kept.clear()
        self._warm.clear()

    def run(self, key: Hashable, step: Callable[[], None], note: Callable[[], Any] | None = None) -> Recorded | None:
        """Run one step of ``key``: eagerly (no recorder, a warm-up, or a key whose recording failed)
        or from its recording (made now if needed). Returns the recording that ran, or None for an
        eager step. ``note()`` is called right after a recording, and its value kept with it."""
        if self.recorder is None or key in self._eager_only:
            self.times.eager += 1
            step()
            return None
        kept = self._kept.get(key)
        if kept is None:
            if self._warm.get(key, 0) < self.warmup:
                self._warm[key] = self._warm.get(key, 0) + 1
                self.times.eager += 1
                self.recorder.warm(step)
                return None
            kept = self._record(key, step, note)
            if kept is None:
                return None
            if self.recorder.ran_while_recording:
                self._count_replay(kept)
                return kept
        self._kept.move_to_end(key)
        if self.recorder.ran_while_recording:  # a stand-in replay runs the Python: its counts are the replay's
            before = self.transfer.stats.copy()
            self.recorder.replay(kept.graph)
            self.transfer.stats = before
        else:
            self.recorder.replay(kept.graph)
        self._count_replay(kept)
        return kept

    def _count_replay(self, kept: Recorded) -> None:
        kept.replays += 1
        self.times.replays += 1
        self.transfer.stats.add_(kept.moved)

    def _record(self, key: Hashable, step: Callable[[], None], note: Callable[[], Any] | None) -> Recorded | None:
        started = time.perf_counter()
        before = self.transfer.stats.copy()
        try:
            with recording():
                graph = self.recorder.record(step)
        except Exception as exc:  # whatever broke the capture, the process goes on eagerly
            self.transfer.stats = before
            self.recorder.recover()
            self._eager_only.add(key)
            reason = f"{type(exc).__name__}: {exc}"
            self.times.failed.append(reason)
            logger.warning("recording the %s failed (%s); this layout runs eagerly from now on", self.name, reason)
            self.times.eager += 1
            step()
            return None
        moved = self.transfer.stats.minus(before)
        self.transfer.stats = before  # what one step moves is counted once per replay
        kept = Recorded(graph, moved, note() if note is not None else None)
        self._kept[key] = kept
        while len(self._kept) > self.max_graphs:
            self._kept.popitem(last=False)
        elapsed = time.perf_counter() - started
        self.times.recording += elapsed
        self.times.recordings += 1
        logger.info(
            "%s recorded in %.0f ms (%d recording%s kept, at most %d)",
            self.name,
            elapsed * 1e3,
            len(self._kept),
            "" if len(self._kept) == 1 else "s",
            self.max_graphs,
        )
        return kept

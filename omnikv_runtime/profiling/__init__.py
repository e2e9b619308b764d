"""Memory profiling of OmniKV runs: ``with okv.profile_memory(engine, out_dir) as prof: engine.generate(...)``.

OmniKV (Hao et al., "OmniKV: Dynamic Context Selection for Efficient Long-Context LLMs", ICLR 2025)
trades GPU memory for host memory and PCIe traffic; this shows the trade over time. A sampling
thread records GPU memory (torch allocator, per device), host RSS and pinned bytes (psutil; pinned
= the host tier when it is pinned), bytes per KV tier (``cache.tier_bytes()``) and the transfer
counters; marks record each prefill chunk, each decode step and each filter layer's fetch (all
from the engine's listener events: the bounds and kind of each forward, and the fetches). On exit
it writes ``report.json``, ``timeline.png`` (matplotlib, optional) and a torch.profiler Chrome
trace (``trace.json.gz``, opens in Perfetto) with the memory samples added as counter tracks and
the fetches as spans. Observers are never called while a decode step is being recorded in a CUDA
graph, so profiling works with graphs on; a replayed step runs no Python and leaves no mark, but
the tiers are sampled all along (``generation.cuda_graphs = false`` marks every step).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import torch

from omnikv_runtime.config import ProfilingSection, load_config
from omnikv_runtime.listeners import EngineListener, Fetch, ForwardEnd, ForwardStart
from omnikv_runtime.profiling.report import build_report

logger = logging.getLogger(__name__)

_START_MARK = "omnikv.profile_start"
KINETO_LOG_LEVEL_ENV = "KINETO_LOG_LEVEL"
QUIET_KINETO_LOG_LEVEL = "6"  # above kineto's USDT lines (5) and errors (4)


class MemoryProfiler:
    """Samples memory and records marks for the engines it watches; see :func:`profile_memory`."""

    def __init__(self, out_dir: str | Path | None = None, config: ProfilingSection | None = None) -> None:
        self.config = config or ProfilingSection()
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.engines: list[Any] = []
        self.samples: list[dict[str, Any]] = []
        self.marks: list[dict[str, Any]] = []
        self.files: dict[str, str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._torch_profiler: Any = None
        self._open: dict[int, list[Any]] = {}  # model -> [its open mark, its record_function or None]
        self._watchers: list[_EngineWatch] = []
        self.t0 = time.perf_counter()
        self._process = psutil.Process()
        self._cuda = torch.cuda.is_available()

    # watching -------------------------------------------------------------------------------
    def watch(self, engine: Any) -> None:
        """Record this engine's tiers, its model's forwards and its caches' fetches (through the
        engine's listeners: nothing is observed, and nothing waits, while a step is being recorded)."""
        self.engines.append(engine)
        engine.release_graphs()  # a kept decode loop would replay from its first step: no step marked
        watcher = _EngineWatch(self, engine)
        engine.add_listener(watcher)
        self._watchers.append(watcher)

    def _forward_started(self, model: Any, decoding: bool, tokens: int, past: int, start: float) -> None:
        if id(model) in self._open:
            return  # a forward through the cache is already marked
        kind = "decode" if decoding else "prefill"
        mark = {"kind": kind, "tokens": tokens, "past": past, "start": start - self.t0}
        function = torch.profiler.record_function(f"omnikv.{kind}")
        function.__enter__()
        self._open[id(model)] = [mark, function]
        self.sample()

    def _forward_ended(self, model: Any, tokens: int, start: float) -> None:
        mark, function = self._open.pop(id(model), (None, None))
        if mark is None:  # a forward without the runtime's cache
            mark = {"kind": "forward", "tokens": tokens, "past": 0, "start": start - self.t0}
        if function is not None:
            function.__exit__(None, None, None)
        if self._cuda:
            torch.cuda.synchronize()  # the step's end, not its launch; marks bound real GPU work
        mark["end"] = time.perf_counter() - self.t0
        with self._lock:
            self.marks.append(mark)
        self.sample()

    def _fetched(self, event: Fetch) -> None:
        mark = {"kind": "fetch", "layer": event.layer, "start": event.start - self.t0, "end": event.end - self.t0}
        mark.update(tokens=event.tokens, bytes=event.bytes)
        with self._lock:
            self.marks.append(mark)

    # sampling -------------------------------------------------------------------------------
    def sample(self) -> dict[str, Any]:
        """Take one sample now (the thread calls this every ``interval_ms``)."""
        entry: dict[str, Any] = {"t": time.perf_counter() - self.t0, "host_rss": self._process.memory_info().rss}
        if self._cuda:
            entry["gpu"] = {
                str(index): {
                    "allocated": torch.cuda.memory_allocated(index),
                    "reserved": torch.cuda.memory_reserved(index),
                    "max_allocated": torch.cuda.max_memory_allocated(index),
                }
                for index in range(torch.cuda.device_count())
            }
        tiers: dict[str, int] = {}
        transfer = {"bytes_fetched": 0, "bytes_written": 0, "gathers": 0}
        pinned = 0
        for watcher in list(self._watchers):
            engine, cache = watcher.engine, watcher.cache
            if cache is not None:
                for key, value in cache.tier_bytes().items():
                    tiers[key] = tiers.get(key, 0) + value
                pinned += sum(a.nbytes() for a in cache.tiers.arenas if a is not None and _pinned(a.data))
            for key in transfer:
                transfer[key] += getattr(engine.transfer.stats, key)
        entry.update(tiers=tiers, pinned=pinned, transfer=transfer)
        with self._lock:
            self.samples.append(entry)
        return entry

    def _loop(self) -> None:
        interval = self.config.interval_ms / 1000
        while not self._stop.wait(interval):
            self.sample()

    # lifecycle ------------------------------------------------------------------------------
    def start(self) -> MemoryProfiler:
        if self.out_dir is not None and self.config.trace:
            # torch's profiler library (kineto) writes "USDT: ... profiler_start" lines straight to
            # stderr; its level 6 silences them. Read once, when the first profile starts; a level
            # set in the environment is kept.
            os.environ.setdefault(KINETO_LOG_LEVEL_ENV, QUIET_KINETO_LOG_LEVEL)
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self._cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._torch_profiler = torch.profiler.profile(activities=activities)
            self._torch_profiler.__enter__()
        self.t0 = time.perf_counter()
        with torch.profiler.record_function(_START_MARK):
            self.sample()
        self._thread = threading.Thread(target=self._loop, name="omnikv-memory-profiler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()
        for watcher in self._watchers:
            watcher.engine.remove_listener(watcher)
        if self._torch_profiler is not None:
            self._torch_profiler.__exit__(None, None, None)
        if self.out_dir is not None:
            self.write(self.out_dir)

    # output ---------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        return build_report(self)

    def write(self, out_dir: str | Path) -> dict[str, str]:
        """Write report.json, timeline.png (if matplotlib is there) and the Chrome trace into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self._torch_profiler is not None:
            self.files["chrome_trace"] = str(self._write_trace(out))
        report = self.report()
        if self.config.png:
            from omnikv_runtime.profiling.plot import plot_report

            png = out / "timeline.png"
            if plot_report(report, png):
                self.files["timeline_png"] = str(png)
        self.files["report"] = str(out / "report.json")
        report["files"] = dict(self.files)
        (out / "report.json").write_text(json.dumps(report, separators=(",", ":")), encoding="utf-8")
        return self.files

    def _write_trace(self, out: Path) -> Path:
        raw = out / "trace.json"
        self._torch_profiler.export_chrome_trace(str(raw))
        trace = json.loads(raw.read_text(encoding="utf-8"))
        events = trace["traceEvents"] if isinstance(trace, dict) else trace
        start = next((e for e in events if e.get("name") == _START_MARK and "ts" in e), None)
        if start is not None:  # memory samples as Perfetto counter tracks, fetches as spans, on the profiler's clock
            base = float(start["ts"])
            pid = start.get("pid", 0)
            tid = start.get("tid", 0)
            for mark in (m for m in self.marks if m["kind"] == "fetch"):
                span = {"name": f"omnikv.fetch.layer{mark['layer']}", "ph": "X", "pid": pid, "tid": tid}
                span.update(ts=base + mark["start"] * 1e6, dur=(mark["end"] - mark["start"]) * 1e6)
                events.append(span)
            for entry in self.samples:
                ts = base + entry["t"] * 1e6
                events.append({"name": "KV tiers (bytes)", "ph": "C", "ts": ts, "pid": pid, "args": entry["tiers"]})
                host = {"rss": entry["host_rss"], "pinned": entry["pinned"]}
                events.append({"name": "host memory (bytes)", "ph": "C", "ts": ts, "pid": pid, "args": host})
                for device, stats in entry.get("gpu", {}).items():
                    args = {"allocated": stats["allocated"], "reserved": stats["reserved"]}
                    events.append(
                        {"name": f"GPU {device} memory (bytes)", "ph": "C", "ts": ts, "pid": pid, "args": args}
                    )
        target = out / "trace.json.gz"
        with gzip.open(target, "wt", encoding="utf-8") as handle:
            json.dump(trace, handle)
        raw.unlink()
        return target


class _EngineWatch(EngineListener):
    """The profiler's listener on one engine: each forward's kind and bounds, the fetches, the latest cache."""

    def __init__(self, profiler: MemoryProfiler, engine: Any) -> None:
        self.profiler = profiler
        self.engine = engine
        self.cache: Any = None  # the latest cache the engine's forwards ran through while profiled

    def forward_start(self, event: ForwardStart) -> None:
        self.cache = event.cache
        self.profiler._forward_started(self.engine.model, event.decoding, event.tokens, event.past, event.time)

    def forward_end(self, event: ForwardEnd) -> None:
        self.profiler._forward_ended(self.engine.model, event.tokens, event.start)

    def fetch(self, event: Fetch) -> None:
        self.profiler._fetched(event)


def _pinned(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and torch.cuda.is_available() and tensor.is_pinned()


@contextlib.contextmanager
def profile_memory(
    engine: Any = None, out_dir: str | Path | None = None, config: ProfilingSection | dict | None = None
) -> Iterator[MemoryProfiler]:
    """Profile memory while the block runs; ``engine`` (or a list of engines, or None) is watched.

    With ``out_dir`` the report, the PNG timeline and the Chrome trace are written there on exit;
    without it, read ``prof.report()``.
    """
    if isinstance(config, dict):  # checked like the config file's profiling section
        config = load_config({"profiling": config}).profiling
    if config is None and engine is not None and not isinstance(engine, (list, tuple)):
        config = engine.config.profiling
    profiler = MemoryProfiler(out_dir, config)
    engines = engine if isinstance(engine, (list, tuple)) else ([engine] if engine is not None else [])
    for item in engines:
        profiler.watch(item)
    profiler.start()
    try:
        yield profiler
    finally:
        profiler.stop()

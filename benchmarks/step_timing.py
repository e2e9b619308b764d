"""Timing helpers of the GPU benchmarks: decode steps, host syncs, a profiler trace's GPU-busy
time and kernel overlap, link bandwidths, and SDPA backend selection. Imported by decode.py."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

GATHER_KERNEL = "_gather_rows_kernel"


@contextlib.contextmanager
def sdpa_backends(names: str):
    """Restrict SDPA to the named backends (flash, efficient, math, cudnn) inside the block."""
    if not names:
        yield
        return
    table = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    with sdpa_kernel([table[name] for name in names.split(",")]):
        yield


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bandwidths(device: torch.device) -> dict[str, float]:
    """GB/s of a pinned host-to-device copy and of a device-to-device copy (read + write counted once each)."""
    if device.type != "cuda":
        return {"pcie_gbps": None, "hbm_gbps": None}
    size = 1 << 30
    host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
    on_device = torch.empty(size, dtype=torch.uint8, device=device)
    other = torch.empty(size, dtype=torch.uint8, device=device)

    def timed(fn) -> float:
        fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(5):
            fn()
        sync(device)
        return (time.perf_counter() - start) / 5

    pcie = size / timed(lambda: on_device.copy_(host, non_blocking=True)) / 1e9
    hbm = 2 * size / timed(lambda: other.copy_(on_device)) / 1e9
    return {"pcie_gbps": round(pcie, 1), "hbm_gbps": round(hbm, 1)}


class ModelStep:
    """One decode step of an HF-style forward over a cache (the baselines): the next position each call."""

    def __init__(self, forward, cache, batch: int, start: int, device: torch.device, cache_keyword: str) -> None:
        self.forward, self.cache, self.keyword = forward, cache, cache_keyword
        self.tokens = torch.full((batch, 1), 5, device=device)
        self.position = start
        self.batch, self.device = batch, device

    def __call__(self) -> None:
        positions = torch.full((self.batch, 1), self.position, device=self.device)
        with torch.inference_mode():
            self.forward(input_ids=self.tokens, position_ids=positions, use_cache=True, **{self.keyword: self.cache})
        self.position += 1


def decode_steps(step, steps: int, device: torch.device) -> list[float]:
    """Wall ms of each of `steps` calls of `step` (synchronised before and after each)."""
    times = []
    for _ in range(steps):
        sync(device)
        began = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - began) * 1e3)
    return times


def host_syncs(step, device: torch.device) -> int | None:
    """Host synchronisations in one step (torch's sync debug mode counts them as warnings)."""
    if device.type != "cuda":
        return None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message) and "prototype" not in str(w.message)]
    for warning in syncs[:3]:
        print(f"host sync: {warning.filename}:{warning.lineno}: {str(warning.message)[:100]}", file=sys.stderr)
    return len(syncs)


def gpu_profile(step, steps: int, device: torch.device, trace_path: str | None = None) -> dict[str, float]:
    """GPU-busy ms, gather ms, hidden share of the gather and kernels per step, from a profiler trace."""
    if device.type != "cuda":
        return {}
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        decode_steps(step, steps, device)
    with tempfile.TemporaryDirectory() as folder:
        path = trace_path or os.path.join(folder, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path, encoding="utf-8") as handle:
            events = json.load(handle)["traceEvents"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    intervals = [(e["ts"], e["ts"] + e["dur"]) for e in gpu]
    gathers = [(e["ts"], e["ts"] + e["dur"]) for e in gpu if GATHER_KERNEL in e.get("name", "")]
    others = union([(e["ts"], e["ts"] + e["dur"]) for e in gpu if GATHER_KERNEL not in e.get("name", "")])
    gather_time = sum(end - begin for begin, end in gathers)
    hidden = sum(overlap(interval, others) for interval in gathers)
    runtime: dict[str, float] = {}  # CUDA runtime calls on the host: where a step blocks
    for event in events:
        if event.get("cat") == "cuda_runtime" and "dur" in event:
            runtime[event["name"]] = runtime.get(event["name"], 0.0) + event["dur"] / 1e3 / steps
    slowest = dict(sorted(runtime.items(), key=lambda item: -item[1])[:4])
    return {
        "runtime_api_ms": {name: round(ms, 2) for name, ms in slowest.items()},
        "gpu_busy_ms": round(total(union(intervals)) / 1e3 / steps, 3),
        "gather_ms": round(gather_time / 1e3 / steps, 3),
        "gather_hidden_share": round(hidden / gather_time, 3) if gather_time else None,
        "kernels_per_step": round(sum(1 for e in gpu if e.get("cat") == "kernel") / steps, 1),
    }


def union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for begin, end in sorted(intervals):
        if merged and begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    return [(begin, end) for begin, end in merged]


def total(intervals: list[tuple[float, float]]) -> float:
    return sum(end - begin for begin, end in intervals)


def overlap(interval: tuple[float, float], merged: list[tuple[float, float]]) -> float:
    begin, end = interval
    return sum(max(0.0, min(end, b) - max(begin, a)) for a, b in merged if a < end and b > begin)

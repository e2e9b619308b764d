"""What an engine's last generation did: :meth:`Engine.stats` and :meth:`Engine.memory_report`.

The record of a run (:class:`RunRecord`) is written by the engine when a generation ends, whichever
path ran it (the engine's own decode loop, or transformers' ``generate`` step by step, also for
``omnikv run``); the counts come from the run's cache and transfer engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psutil
import torch

from omnikv_runtime.listeners import EngineListener, ForwardStart


@dataclass(frozen=True)
class RunRecord:
    """One generation: wall-clock bounds (``time.perf_counter``), its shape, and how it ran."""

    start: float
    end: float
    prompt_tokens: int
    batch: int
    new_tokens: int | None  # None when the output was not a tensor of ids
    first_decode: float | None = None  # when the first decode step began (step-by-step runs)
    loop: Any = None  # the decode loop's phase times (LoopTimes) when the engine's own loop ran


class FirstDecodeTimer(EngineListener):
    """Notes when the first decode step of a step-by-step generation begins."""

    def __init__(self) -> None:
        self.time: float | None = None

    def forward_start(self, event: ForwardStart) -> None:
        if event.decoding and self.time is None:
            self.time = event.time


def run_stats(engine: Any) -> dict[str, Any]:
    """See :meth:`omnikv_runtime.engine.Engine.stats`."""
    cache, run, plan = engine.last_cache, engine.last_run, engine.plan
    out: dict[str, Any] = {
        "plan": plan.describe(),
        "filter_layers": [s.filter_layer for s in plan.segments],
        "sparse_layers": plan.sparse_layers,
        "transfer": engine.transfer.stats.as_dict(),
    }
    if cache is None:
        return out
    if cache.hot_cache_tokens:
        hot = cache.hot_counters()
        out["transfer"]["bytes_fetched"] += hot.pop("hot_bytes_fetched")
        out["transfer"].update(hot)
    steps = cache.selected_log
    out["selected_per_step"] = {
        str(s.filter_layer): [step.get(s.filter_layer, 0) for step in steps] for s in plan.segments
    }
    out["context_tokens"] = cache.context_len
    dropped = cache.selector.policy.dropped_tokens(cache.policy_states())
    out["dropped_tokens"] = {str(layer): n for layer, n in dropped.items()}
    out["decode_steps"] = len(steps)
    if run is not None:
        first_decode = run.end if run.first_decode is None else run.first_decode
        out.update(
            prompt_tokens=run.prompt_tokens,
            batch=run.batch,
            new_tokens=run.new_tokens,
            prefill_seconds=first_decode - run.start,
            decode_seconds=run.end - first_decode,
        )
        if run.loop is not None:
            out.update(
                prefill_seconds=run.loop.prefill,
                decode_seconds=run.loop.decode,
                graph_capture_seconds=run.loop.capture,
                cuda_graph=run.loop.graph,
            )
    return out


def memory_report(engine: Any) -> dict[str, Any]:
    """See :meth:`omnikv_runtime.engine.Engine.memory_report`."""
    cache = engine.last_cache
    cuda = engine.device.type == "cuda"
    return {
        "tiers": cache.tier_bytes() if cache is not None else {},
        "host_tier_device": str(engine.transfer.host_device),
        "compute_device": str(engine.device),
        "weights_bytes": sum(p.numel() * p.element_size() for p in engine.model.parameters()),
        "gpu_peak_bytes": torch.cuda.max_memory_allocated(engine.device) if cuda else None,
        "host_rss_bytes": psutil.Process().memory_info().rss,
    }

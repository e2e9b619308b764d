"""The profiler's report.json: samples, marks, a summary, and tier bytes checked against the geometry.

For each watched engine the final tier bytes of its last cache are recomputed from the model's
geometry (OmniKV's layer roles: Hao et al., ICLR 2025): a tier holds
``layers x tokens x kv_heads x head_dim x 2 (K, V) x dtype size x batch`` bytes, with the tokens of
each tier (dense: the reserved ``prompt + new``; selected: the budget; tail: tokens since the
prompt; host: every stored token). An FP8 host tier (``offload.host_dtype``) holds one byte per
value plus a float32 scale per ``head_dim`` values.
"""

from __future__ import annotations

import datetime
import platform
from typing import Any

import torch

from omnikv_runtime.geometry import ModelGeometry
from omnikv_runtime.layout import Role
from omnikv_runtime.transfer.fp8 import is_quantized, packed_row_bytes


def geometry_check(engine: Any) -> dict[str, Any] | None:
    """Reported vs expected bytes per tier for the engine's last cache (None before any run)."""
    cache = engine.last_cache
    if cache is None or not cache.layers or not cache.layers[0].is_initialized:
        return None
    geometry = ModelGeometry.from_model(engine.model)
    heads, head_dim = geometry.kv_heads, geometry.head_dim
    dtype_bytes = cache.layers[0].dtype.itemsize
    batch = engine.last_run.batch if engine.last_run is not None else 1
    roles = engine.plan.roles
    dense = sum(role is not Role.SPARSE for role in roles)
    sparse = len(roles) - dense
    stored = cache.get_seq_length()
    decoded = cache.decode_steps > 0
    tail = cache.ring_tokens if decoded else 0  # the tail ring is allocated whole when decoding starts
    staged = decoded and cache.tiers.transfer.fetches_rows  # offload: the selected rows' staging buffers
    selected = cache.token_budget if staged else 0
    per = 2 * heads * head_dim * dtype_bytes * batch
    quantized = is_quantized(cache.tiers.transfer.host_dtype)
    host_per = packed_row_bytes(1, heads, head_dim, dtype_bytes, quantized) * batch
    tokens = {
        "gpu_dense": max(cache.tiers.reserve_tokens, 16),
        "gpu_selected": selected,
        "gpu_tail": tail,
        "host": stored,
    }
    layers = {"gpu_dense": dense, "gpu_selected": sparse, "gpu_tail": sparse, "host": sparse}
    reported = cache.tier_bytes()
    check = {}
    for tier, count in tokens.items():
        expected = layers[tier] * count * (host_per if tier == "host" else per)
        check[tier] = {
            "layers": layers[tier],
            "tokens": count,
            "kv_heads": heads,
            "head_dim": head_dim,
            "dtype_bytes": 1 if tier == "host" and quantized else dtype_bytes,
            "scale_bytes": 4 if tier == "host" and quantized else 0,
            "batch": batch,
            "expected": expected,
            "reported": reported[tier],
            "match": expected == reported[tier],
        }
    return check


def _summary(samples: list[dict[str, Any]], marks: list[dict[str, Any]]) -> dict[str, Any]:
    fetches = [m for m in marks if m["kind"] == "fetch"]
    summary: dict[str, Any] = {
        "duration_s": samples[-1]["t"] if samples else 0.0,
        "samples": len(samples),
        "prefill_forwards": sum(m["kind"] == "prefill" for m in marks),
        "decode_steps": sum(m["kind"] == "decode" for m in marks),
        "fetches": len(fetches),
        "bytes_fetched": sum(m["bytes"] for m in fetches),
        "peak_host_rss": max((s["host_rss"] for s in samples), default=0),
        "peak_pinned": max((s["pinned"] for s in samples), default=0),
        "peak_tiers": {},
    }
    for entry in samples:
        for key, value in entry["tiers"].items():
            summary["peak_tiers"][key] = max(summary["peak_tiers"].get(key, 0), value)
        for device, stats in entry.get("gpu", {}).items():
            peaks = summary.setdefault("peak_gpu", {}).setdefault(device, {"allocated": 0, "max_allocated": 0})
            peaks["allocated"] = max(peaks["allocated"], stats["allocated"])
            peaks["max_allocated"] = max(peaks["max_allocated"], stats["max_allocated"])
    decode = [m for m in marks if m["kind"] == "decode"]
    if decode:
        summary["decode_step_ms_median"] = sorted((m["end"] - m["start"]) * 1e3 for m in decode)[len(decode) // 2]
    return summary


def build_report(profiler: Any) -> dict[str, Any]:
    """The whole report of a :class:`~omnikv_runtime.profiling.MemoryProfiler`."""
    import transformers

    meta = {
        "date": now_utc(),
        "host": platform.node(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "interval_ms": profiler.config.interval_ms,
    }
    engines = []
    for engine in profiler.engines:
        engines.append(
            {
                "model": type(engine.model).__name__,
                "plan": engine.plan.describe(),
                "host_dtype": str(engine.transfer.host_dtype or "model").removeprefix("torch."),
                "stats": engine.stats(),
                "tiers_final": engine.last_cache.tier_bytes() if engine.last_cache is not None else {},
                "geometry_check": geometry_check(engine),
            }
        )
    samples = sorted(profiler.samples, key=lambda s: s["t"])
    marks = sorted(profiler.marks, key=lambda m: m["start"])
    return {"meta": meta, "engines": engines, "summary": _summary(samples, marks), "marks": marks, "samples": samples}


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

"""``GET /metrics``: the scheduler's counters and gauges in Prometheus' text exposition format (0.0.4).

Every name starts with ``omnikv_``. Counters end in ``_total``; KV bytes carry a ``tier`` label
(``gpu_dense``, ``gpu_selected``, ``gpu_tail``, ``host_used``, ``host_allocated``); HTTP responses
carry a ``code`` label. No dependency: the text is written here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def batch_metrics(batch: Any, transfer_stats: Any, offloaded: bool) -> dict[str, Any]:
    """The slot batch's part of the scheduler's metrics: prompt tokens prefilled and the forwards that ran them,
    bytes over PCIe (with the sparse layers' KV offloaded), and the KV tiers' bytes."""
    moved = transfer_stats.bytes_fetched + transfer_stats.bytes_prefill_read + transfer_stats.bytes_written
    tiers = batch.cache.tier_bytes()
    return {
        "prefill_tokens_total": batch.prefill_tokens,
        "prefill_forwards_total": batch.prefill_forwards,
        "pcie_bytes_total": moved if offloaded else 0,
        "kv_bytes": {
            "gpu_dense": tiers["gpu_dense"],
            "gpu_selected": tiers["gpu_selected"],
            "gpu_tail": tiers["gpu_tail"],
            "host_used": tiers["host"],
            "host_allocated": tiers["host_allocated"],
        },
    }


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Scheduler.metrics() key -> (metric name, type, help)
SCHEDULER_METRICS: dict[str, tuple[str, str, str]] = {
    "requests_total": ("omnikv_requests_total", "counter", "Requests the scheduler admitted."),
    "requests_rejected_total": (
        "omnikv_requests_rejected_total",
        "counter",
        "Requests the scheduler refused (never fit, or queue full).",
    ),
    "requests_running": ("omnikv_requests_running", "gauge", "Requests holding a batch slot (prefilling or decoding)."),
    "queue_depth": ("omnikv_queue_depth", "gauge", "Requests waiting for a batch slot."),
    "batch_size": ("omnikv_batch_size", "gauge", "Rows in the last decode step."),
    "slots_free": ("omnikv_slots_free", "gauge", "Batch slots free."),
    "prompt_tokens_total": ("omnikv_prompt_tokens_total", "counter", "Prompt tokens of the admitted requests."),
    "generation_tokens_total": ("omnikv_generation_tokens_total", "counter", "Tokens generated."),
    "prefill_tokens_total": (
        "omnikv_prefill_tokens_total",
        "counter",
        "Prompt tokens prefilled (each turn runs at most the turn's budget of them).",
    ),
    "prefill_forwards_total": (
        "omnikv_prefill_forwards_total",
        "counter",
        "Forwards that ran prefill chunks (chunks of several requests run packed in one).",
    ),
    "turns_total": ("omnikv_turns_total", "counter", "Turns of the scheduler (prefill chunks, then a decode step)."),
    "pcie_bytes_total": (
        "omnikv_pcie_bytes_total",
        "counter",
        "Bytes moved between the host tier and the device: selected rows fetched, prefill reads, KV written.",
    ),
    "prefix_cache_lookup_tokens_total": (
        "omnikv_prefix_cache_lookup_tokens_total",
        "counter",
        "Prompt tokens of the admitted requests looked up in the prefix cache.",
    ),
    "prefix_cache_hit_tokens_total": (
        "omnikv_prefix_cache_hit_tokens_total",
        "counter",
        "Prompt tokens whose KV came from the prefix cache (not prefilled).",
    ),
    "prefix_cache_evictions_total": (
        "omnikv_prefix_cache_evictions_total",
        "counter",
        "Prefix-cache blocks evicted to make room.",
    ),
    "prefix_cache_in_place_tokens_total": (
        "omnikv_prefix_cache_in_place_tokens_total",
        "counter",
        "Prompt tokens reused from the KV their slot still held (no copy; counted in the hit tokens too).",
    ),
    "prefix_cache_blocks": ("omnikv_prefix_cache_blocks", "gauge", "Prefix-cache blocks held."),
    "prefix_cache_gpu_bytes": (
        "omnikv_prefix_cache_gpu_bytes",
        "gauge",
        "GPU bytes of the prefix-cache blocks held (dense layers; sparse layers too when not offloaded).",
    ),
    "prefix_cache_host_bytes": (
        "omnikv_prefix_cache_host_bytes",
        "gauge",
        "Host bytes of the prefix-cache blocks held (the sparse layers' host-tier rows).",
    ),
}
KV_BYTES = ("omnikv_kv_bytes", "gauge", "Bytes of KV cache per tier.")
HTTP_RESPONSES = ("omnikv_http_responses_total", "counter", "HTTP responses sent, by status code.")


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _label(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(lines: list[str], name: str, kind: str, text: str, samples: list[tuple[str, float]]) -> None:
    lines.append(f"# HELP {name} {text}")
    lines.append(f"# TYPE {name} {kind}")
    lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)


def render_metrics(metrics: Mapping[str, object], http_responses: Mapping[int, int] | None = None) -> str:
    """The exposition text of ``Scheduler.metrics()`` (keys it lacks are left out) and of the HTTP
    response counts by status code."""
    lines: list[str] = []
    for key, (name, kind, text) in SCHEDULER_METRICS.items():
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            _family(lines, name, kind, text, [("", value)])
    tiers = metrics.get("kv_bytes")
    if isinstance(tiers, Mapping) and tiers:
        samples = [(f'{{tier="{_label(tier)}"}}', value) for tier, value in sorted(tiers.items())]
        _family(lines, *KV_BYTES, samples)
    if http_responses:
        samples = [(f'{{code="{code}"}}', count) for code, count in sorted(http_responses.items())]
        _family(lines, *HTTP_RESPONSES, samples)
    return "\n".join(lines) + "\n"

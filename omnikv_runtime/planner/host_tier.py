"""Which host tier would make a decode step faster: the model's dtype or FP8, by the bytes it moves.

With the sparse layers' KV in host memory (``offload.device = "cpu"``), each decode step fetches the
selected rows of every sparse layer over PCIe (OmniKV, Hao et al., ICLR 2025: the filter layers'
budget of tokens) and writes the new token's row back. An FP8 tier (``offload.host_dtype =
"float8_e4m3fn"``) stores one byte per value plus a float32 scale per token, layer, K/V and KV head,
so a step moves about half the bytes of a bfloat16 tier. The step's floor over the link is those
bytes over the host-to-device bandwidth: measured here with a short pinned copy on CUDA, or this
module's default figure elsewhere. The comparison is a report only: the configured tier is kept.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from omnikv_runtime.config import HOST_DTYPES, OmniKVConfig
from omnikv_runtime.geometry import ModelGeometry
from omnikv_runtime.layout import LayerPlan
from omnikv_runtime.planner import DTYPE_BYTES
from omnikv_runtime.transfer.fp8 import packed_row_bytes

# a pinned host-to-device copy over a PCIe 5.0 x16 link: 52-55 GB/s measured on an H100 host
DEFAULT_HOST_TO_DEVICE = 50e9
DEFAULT_SOURCE = "the planner's default figure, no CUDA device here: a PCIe 5.0 x16 link's pinned copy"
_PROBE_BYTES = 64 * 2**20


def host_to_device_bandwidth(device: torch.device | str | None = None) -> tuple[float, str]:
    """Bytes per second from pinned host memory to ``device``, and where the figure comes from: measured
    (a 64 MiB pinned copy, best of three, once per device and process) on CUDA, else the default."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return DEFAULT_HOST_TO_DEVICE, DEFAULT_SOURCE
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _measured(index)


@functools.cache
def _measured(index: int) -> tuple[float, str]:
    device = torch.device("cuda", index)
    source = torch.empty(_PROBE_BYTES, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(_PROBE_BYTES, dtype=torch.uint8, device=device)
    target.copy_(source, non_blocking=True)  # warm-up
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    name = torch.cuda.get_device_name(device)
    return _PROBE_BYTES / best, f"measured: a 64 MiB pinned copy to {name}"


def decode_step_bytes(
    geometry: ModelGeometry, config: OmniKVConfig, batch: int, context: int, host_dtype: str, dtype: str | None = None
) -> int:
    """Host-tier bytes one decode step moves over one GPU's link: each sparse layer's selected rows
    (the token budget, at most the context) fetched and the new token's row written back, whole batch
    (one rank's KV heads with tensor parallelism; hot-cache hits not counted)."""
    dtype_bytes = DTYPE_BYTES[dtype or config.model.dtype]
    section = config.omnikv
    plan = LayerPlan.build(geometry.num_layers, section.filter_layers, section.wait_layers, section.enabled)
    rank = geometry.shard(config.distributed.tp_size)
    rows = min(section.token_budget_for(context), context) + 1
    row_bytes = packed_row_bytes(1, rank.kv_heads, rank.head_dim, dtype_bytes, host_dtype != "auto")
    return batch * len(plan.sparse_layers) * rows * row_bytes


def compare_host_tiers(
    geometry: ModelGeometry,
    config: OmniKVConfig,
    batch: int,
    context: int,
    bandwidth: float,
    bandwidth_source: str,
    dtype: str | None = None,
) -> dict[str, Any] | None:
    """Each host tier's bytes a decode step moves and its floor over the link, and which is faster; None
    when there is no host tier to choose (OmniKV off, no sparse layer, or ``offload.device = "none"``)."""
    if not config.omnikv.enabled or config.offload.device != "cpu" or batch < 1 or context < 1:
        return None
    tiers = {}
    for host_dtype in HOST_DTYPES:
        moved = decode_step_bytes(geometry, config, batch, context, host_dtype, dtype)
        tiers[host_dtype] = {"bytes_per_step": moved, "step_floor_ms": moved / bandwidth * 1e3}
    if not tiers["auto"]["bytes_per_step"]:
        return None
    faster = min(tiers, key=lambda name: tiers[name]["bytes_per_step"])
    return {
        "configured": config.offload.host_dtype,
        "faster": faster,
        "model_dtype": dtype or config.model.dtype,
        "batch": batch,
        "context": context,
        "bandwidth": bandwidth,
        "bandwidth_source": bandwidth_source,
        "tiers": tiers,
    }


def _tier_name(host_dtype: str, model_dtype: str) -> str:
    return f"the model's dtype ({model_dtype})" if host_dtype == "auto" else host_dtype


def describe_host_tiers(comparison: dict[str, Any]) -> str:
    """One paragraph: which tier would be faster, the bytes a step moves with each, the bandwidth and its
    source, each tier's floor, and that the configured tier stays."""
    tiers, model_dtype = comparison["tiers"], comparison["model_dtype"]
    faster, configured = comparison["faster"], comparison["configured"]
    other = next(name for name in tiers if name != faster)
    moved = " and ".join(
        f"{tiers[name]['bytes_per_step'] / 1e6:,.1f} MB with {_tier_name(name, model_dtype)} "
        f"(floor {tiers[name]['step_floor_ms']:.2f} ms)"
        for name in (faster, other)
    )
    text = (
        f"{_tier_name(faster, model_dtype)} would be the faster host tier for batch {comparison['batch']} x "
        f"{comparison['context']:,} tokens: a decode step moves {moved} over PCIe, at "
        f"{comparison['bandwidth'] / 1e9:.1f} GB/s ({comparison['bandwidth_source']}; floor = bytes / bandwidth, "
        "without hot-cache hits)."
    )
    if configured == faster:
        return text + " It is the configured one."
    return text + (
        f" The configured tier ({configured}) is kept; "
        f'offload.host_dtype = "{faster}" would use the other'
        + (" (FP8 codes with a scale per token and KV head: lossy)." if faster != "auto" else ".")
    )

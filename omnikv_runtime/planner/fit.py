"""Does a run fit, what is the longest context that does, and what to change when it does not.

Built on :func:`omnikv_runtime.planner.plan_memory` (OmniKV, Hao et al., ICLR 2025: only the
early, filter and wait layers keep full KV on the GPU; the rest is offloaded and fetched by budget).
The engine calls :func:`check_run` before a CUDA ``generate`` allocates anything, and refuses a run
that cannot fit with a :class:`~omnikv_runtime.errors.PromptError` naming what to change.
"""

from __future__ import annotations

import logging
from typing import Any

import psutil
import torch

from omnikv_runtime.config import OmniKVConfig
from omnikv_runtime.errors import PromptError
from omnikv_runtime.planner import MemoryPlan, ModelGeometry, plan_memory

logger = logging.getLogger(__name__)

DEFAULT_HEADROOM = 0.05  # share of each memory kept free (allocator fragmentation, CUDA context)
MAX_SEARCH_CONTEXT = 1 << 27


def fits(plan: MemoryPlan, gpu_memory: int, host_memory: int, headroom: float = DEFAULT_HEADROOM) -> dict[str, bool]:
    """Whether the plan's GPU and host needs fit the given memories (minus ``headroom``)."""
    gpu_ok = plan.gpu <= gpu_memory * (1 - headroom)
    host_ok = plan.host <= host_memory * (1 - headroom)
    return {"gpu": gpu_ok, "host": host_ok, "all": gpu_ok and host_ok}


def dense_twin(config: OmniKVConfig) -> OmniKVConfig:
    """The same config with OmniKV off (every layer dense on the GPU)."""
    dense = config.model_copy(deep=True)
    dense.omnikv.enabled = False
    return dense


def longest_context(
    geometry: ModelGeometry,
    config: OmniKVConfig,
    batch: int,
    new_tokens: int,
    gpu_memory: int,
    host_memory: int,
    headroom: float = DEFAULT_HEADROOM,
    dtype: str | None = None,
    prefill: bool = True,
) -> dict[str, Any]:
    """The longest prompt (tokens) that fits, found by bisection, and which memory limits it.

    ``prefill=False``: for a cache filled directly (decode only, no prefill activations)."""

    def check(context: int) -> dict[str, bool]:
        plan = plan_memory(geometry, config, context, batch, new_tokens, dtype, prefill)
        return fits(plan, gpu_memory, host_memory, headroom)

    def ok(context: int) -> bool:
        return check(context)["all"]

    def _limit(context: int) -> str:
        return "gpu" if not check(context)["gpu"] else "host"

    if not ok(1):
        return {"context": 0, "limited_by": _limit(1)}
    low, high = 1, 2
    while high < MAX_SEARCH_CONTEXT and ok(high):
        low, high = high, high * 2
    if high >= MAX_SEARCH_CONTEXT and ok(MAX_SEARCH_CONTEXT):
        return {"context": MAX_SEARCH_CONTEXT, "limited_by": "search limit"}
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if ok(middle) else (low, middle)
    return {"context": low, "limited_by": _limit(high)}


def suggestions(plan: MemoryPlan, config: OmniKVConfig, gpu_short: bool, host_short: bool) -> list[str]:
    """What to change, the largest contributors first."""
    tips: list[str] = []
    offload = config.offload
    if gpu_short:
        if plan.batch > 1:
            tips.append(f"lower the batch (now {plan.batch})")
        tips.append("shorten the prompt or lower max_new_tokens")
        if not config.omnikv.enabled:
            tips.append("enable OmniKV (omnikv.enabled = true) so sparse layers leave the GPU")
        else:
            if offload.device == "none":
                tips.append("set offload.device = 'cpu' (the sparse layers' full KV moves to host memory)")
            tips.append(
                f"use fewer filter or wait layers (omnikv.filter_layers = {config.omnikv.filter_layers}, "
                f"omnikv.wait_layers = {config.omnikv.wait_layers}: {plan.layers['dense']} of "
                f"{plan.layers['total']} layers keep full KV on the GPU)"
            )
            tips.append(f"lower omnikv.token_budget (now {plan.budget} tokens per sparse layer)")
            if offload.hot_cache_tokens:
                tips.append(f"lower offload.hot_cache_tokens (now {offload.hot_cache_tokens})")
        if plan.activations["prefill"] >= plan.activations["decode"]:
            tips.append(
                f"lower prefill.chunk_size (now {config.prefill.chunk_size}) or prefill.read_block_tokens "
                f"(now {config.prefill.read_block_tokens})"
            )
        if not plan.weights_offloaded:
            tips.append(
                f"split the model over more GPUs (distributed.tp_size, now {plan.tp_size}), or keep the weights in "
                "host memory (distributed.offload_weights = true, ZeRO-Inference)"
            )
    if host_short:
        if plan.batch > 1:
            tips.append(f"lower the batch (now {plan.batch})")
        if plan.host_dtype == "auto":
            tips.append("set offload.host_dtype = 'float8_e4m3fn' (about half the host bytes per token)")
        tips.append("shorten the prompt, or keep the sparse layers on the GPU (offload.device = 'none') if it has room")
    return list(dict.fromkeys(tips))


def _gb(value: int) -> str:
    return f"{value / 1e9:.2f} GB"


def describe_shortfall(plan: MemoryPlan, config: OmniKVConfig, gpu_free: int, host_free: int) -> str | None:
    """A message naming the shortfall and what to change, or None when the plan fits."""
    gpu_short, host_short = plan.gpu > gpu_free, plan.host > host_free
    if not (gpu_short or host_short):
        return None
    tiers = plan.tiers
    parts = []
    if gpu_short:
        pieces = [
            f"weights {_gb(plan.weights)}" + (" in flight" if plan.weights_offloaded else ""),
            f"dense-layer KV {_gb(tiers['gpu_dense'])}",
            f"selected rows and tail ring {_gb(tiers['gpu_selected'] + tiers['gpu_tail'])}",
            f"hot cache {_gb(tiers['gpu_hot'] + tiers['gpu_hot_state'])}",
        ]
        if plan.offload == "none" and plan.omnikv:
            pieces.append(f"sparse-layer KV {_gb(tiers['host_allocated'])}")
        pieces.append(f"activations {_gb(max(plan.activations.values()))}")
        parts.append(f"GPU needs {_gb(plan.gpu)} ({', '.join(pieces)}) but {_gb(gpu_free)} are available")
    if host_short:
        stored = "the model's dtype" if plan.host_dtype == "auto" else plan.host_dtype
        per_token = f"{plan.host_bytes_per_token:,} bytes per token in {stored}"
        whose = f" of {plan.tp_size} ranks" if plan.tp_size > 1 else ""
        weights = f", weights {_gb(plan.weights_host)}" if plan.weights_offloaded else ""
        parts.append(
            f"host needs {_gb(plan.host)} (pinned KV of the sparse layers{whose}, {per_token}{weights}) but "
            f"{_gb(host_free)} are available"
        )
    what = f"{plan.batch} x {plan.context} prompt tokens + {plan.new_tokens} new tokens"
    tips = "; ".join(suggestions(plan, config, gpu_short, host_short))
    return f"this run ({what}) does not fit: {'; '.join(parts)}. To fit: {tips}"


def available_memory(device: torch.device) -> tuple[int, int]:
    """(GPU bytes the run may still use, host bytes available). On CUDA: free memory plus what the
    caching allocator holds unused, within this process's cap when one is set
    (``torch.cuda.set_per_process_memory_fraction``: a GPU shared with other processes)."""
    host = psutil.virtual_memory().available
    if device.type != "cuda":
        return 0, host
    free, total = torch.cuda.mem_get_info(device)
    reserved = torch.cuda.memory_reserved(device)
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _device: 1.0)(device)
    cap = int(total * fraction)
    free = max(0, min(free, cap - reserved))
    return free + reserved - torch.cuda.memory_allocated(device), host


def _usable(gpu_free: int, host_free: int) -> tuple[int, int]:
    """What a run may take of the free GPU and host memory: both less the headroom. Pinned host memory is never
    paged out, so a host tier pinning all that is available would leave the host nothing."""
    return int(gpu_free * (1 - DEFAULT_HEADROOM)), int(host_free * (1 - DEFAULT_HEADROOM))


def check_run(
    geometry: ModelGeometry,
    config: OmniKVConfig,
    device: torch.device,
    batch: int,
    context: int,
    new_tokens: int,
    reserved: tuple[int, int] = (0, 0),
    prefill_rows: int | None = None,
    prefill_tokens: int | None = None,
) -> MemoryPlan:
    """Raise PromptError when a CUDA run of this size (``prefill_rows`` of its rows prefilled together, default
    all; ``prefill_tokens`` in one forward, default one chunk), and ``reserved`` ``(GPU, host)`` bytes beside it,
    cannot fit the memory free now (weights resident)."""
    plan = plan_memory(
        geometry, config, context, batch, new_tokens, prefill_rows=prefill_rows, prefill_tokens=prefill_tokens
    )
    if device.type != "cuda":
        return plan
    gpu_free, host_free = available_memory(device)
    needed = _resident_excluded(plan)
    needed.gpu += reserved[0]
    needed.host += reserved[1]
    message = describe_shortfall(needed, config, *_usable(gpu_free, host_free))
    if message:
        raise PromptError(message)
    logger.info("memory plan: GPU %s beyond the weights, host %s", _gb(needed.gpu), _gb(needed.host))
    return plan


def _resident_excluded(plan: MemoryPlan) -> MemoryPlan:
    """The plan without its weights (they are already in GPU memory when the engine checks)."""
    copy = MemoryPlan(**{**plan.as_dict()})
    copy.gpu -= plan.weights
    copy.weights = 0
    return copy


MAX_SEARCH_SLOTS = 1 << 16


def shortfall_beside_weights(plan: MemoryPlan, config: OmniKVConfig, gpu_free: int, host_free: int) -> str | None:
    """:func:`describe_shortfall` of a plan whose weights are resident already, in the memory free now: the test
    of :func:`check_run` (GPU and host free memory, each less the headroom). None when it fits."""
    return describe_shortfall(_resident_excluded(plan), config, *_usable(gpu_free, host_free))


def most_slots(
    geometry: ModelGeometry,
    config: OmniKVConfig,
    context: int,
    new_tokens: int,
    gpu_free: int,
    host_free: int,
    limit: int = MAX_SEARCH_SLOTS,
    prefill_tokens: int | None = None,
) -> dict[str, Any]:
    """The most requests of ``context`` tokens (prompt and ``new_tokens`` together) that fit side by side
    beside the resident weights in ``gpu_free`` GPU and ``host_free`` host bytes (the server's slots, each
    planned as one row of a batch, prefilled one request at a time, ``prefill_tokens`` a forward: default one
    chunk), at most ``limit``; and which memory stops
    one more (``"gpu"`` or ``"host"``, ``"search limit"`` at the limit). 0 when not even one fits."""
    if context <= new_tokens:
        raise ValueError(f"a context of {context} tokens leaves no room for a prompt beside {new_tokens} new tokens")

    def plan(rows: int) -> MemoryPlan:
        return plan_memory(
            geometry, config, context - new_tokens, rows, new_tokens, prefill_rows=1, prefill_tokens=prefill_tokens
        )

    def ok(rows: int) -> bool:
        return shortfall_beside_weights(plan(rows), config, gpu_free, host_free) is None

    low, high = 0, 1
    while high <= limit and ok(high):
        low, high = high, high * 2
    if low == limit or (high > limit and ok(limit)):
        return {"slots": limit, "limited_by": "search limit"}
    high = min(high, limit)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if ok(middle) else (low, middle)
    over = _resident_excluded(plan(high))
    gpu_short = over.gpu > int(gpu_free * (1 - DEFAULT_HEADROOM))
    return {"slots": low, "limited_by": "gpu" if gpu_short else "host"}

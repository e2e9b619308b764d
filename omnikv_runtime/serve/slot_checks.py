"""What the server's scheduler checks as it is built: the size of its slots, how many slots this machine can
hold (said at start, and taken by ``--max-batch auto``), that the slots asked for fit in memory, and, under
tensor parallelism, that every rank built the same slots (each rank holds its heads of every slot, and rank
0's plans name slots by number).

On CUDA the count comes from the memory planner, exactly as the check that refuses too many slots sees it:
the slots' KV tiers and activations beside the weights already resident, in the GPU memory free now (less
the planner's headroom) and the host memory available, with the config's host tier (the model's dtype, or
FP8 codes with a scale per token). Beside it the planner counts what a dense server (OmniKV off: every
layer's KV on the GPU, nothing offloaded) could hold on the same card. On the CPU every layer's KV is in
host memory and the count is of host memory alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psutil
import torch
import torch.distributed as dist

from omnikv_runtime.errors import ConfigError, PromptError
from omnikv_runtime.geometry import ModelGeometry
from omnikv_runtime.serve import MAX_AUTO_BATCH, MIN_CONTEXT

logger = logging.getLogger(__name__)

CPU_SHARE = 0.9  # on the CPU, the slots may take this share of the memory available


def check_scheduler_arguments(max_batch: object, max_queue: object, max_prefill_tokens: object) -> None:
    """Raise ConfigError, naming the argument, for slots, a queue or a turn's prefill budget out of range."""
    for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(name, value, f"an integer of at least {low}")
    if max_prefill_tokens is not None and (
        isinstance(max_prefill_tokens, bool) or not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1
    ):
        raise ConfigError(
            "max_prefill_tokens",
            max_prefill_tokens,
            "a whole number of prompt tokens per turn, at least 1 (default: prefill.chunk_size)",
        )


def slot_sizes(engine: Any, max_context: int | None, max_new_tokens: int | None) -> tuple[int, int]:
    """(context of a slot, new tokens of a request at most): ``max_context`` within the model's and the config's
    limits, and ``max_new_tokens`` (default 1024, or the whole context with ``omnikv.tail_tokens`` set) within it."""
    limits = [x for x in (max_context, engine.max_positions, engine.config.model.max_context_len) if x]
    if not limits:
        raise ConfigError("model.max_context_len", None, "a context limit (the model declares none)")
    context = min(limits)
    if context < MIN_CONTEXT:
        raise ConfigError(
            "max_context",
            context,
            f"at least {MIN_CONTEXT} tokens: a slot is its context plus one scratch column, and the dense "
            f"layers' KV buffers are never narrower than {MIN_CONTEXT + 1} columns, so a narrower slot "
            "would not match them",
        )
    new_tokens = engine.config.omnikv.tail_tokens and context or max_new_tokens or 1024
    return context, min(new_tokens, context - 1)


@dataclass
class SlotCapacity:
    """How many requests of ``context`` tokens this machine holds side by side (see the module docstring)."""

    context: int
    new_tokens: int
    slots: int  # this server's, as configured
    limited_by: str  # the memory one more slot would not fit in: "gpu", "host" or "search limit"
    where: str  # "cuda" (the planner) or "cpu" (host memory)
    tier: str  # where the sparse layers' KV is, in words
    dense_slots: int | None = None  # a dense server on the same card (CUDA only)
    shortfall: str | None = None  # with no slot: why one does not fit, and what to change


def _cpu_slot_bytes(engine: Any, context: int, new_tokens: int) -> int:
    """One slot's KV on the CPU: every layer's columns and its tail ring."""
    geometry = ModelGeometry.from_model(engine.model)
    dtype_bytes = next(engine.model.parameters()).element_size()
    return (context + 1 + new_tokens) * geometry.num_layers * geometry.kv_row_bytes(dtype_bytes)


def _tier_words(config: Any) -> str:
    if not config.omnikv.enabled:
        return "OmniKV off: every layer's KV on the GPU"
    if config.offload.device != "cpu":
        return "OmniKV, the sparse layers' KV on the GPU (offload.device = 'none')"
    stored = f"{config.model.dtype}, the model's dtype" if config.offload.host_dtype == "auto" else "FP8"
    return f"OmniKV, host tier in {stored}"


def slot_capacity(
    engine: Any,
    context: int,
    new_tokens: int,
    prefix_bytes: tuple[int, int] = (0, 0),
    prefill_tokens: int | None = None,
) -> SlotCapacity:
    """How many slots of ``context`` tokens fit on this machine now beside a prefix cache of ``prefix_bytes``
    ``(GPU, host)``, with turns prefilling ``prefill_tokens`` in one forward (default one chunk), and how many a
    dense server would hold."""
    if engine.device.type != "cuda":
        per_slot = _cpu_slot_bytes(engine, context, new_tokens)
        available = max(psutil.virtual_memory().available - sum(prefix_bytes), 0)
        slots = int(CPU_SHARE * available) // per_slot
        tier = f"on the CPU, every layer's KV in host memory, {available / 2**30:.1f} GiB available"
        shortfall = None
        if not slots:
            shortfall = f"one slot's KV takes {per_slot / 2**30:.1f} GiB, {available / 2**30:.1f} GiB are available"
        return SlotCapacity(context, new_tokens, slots, "host", "cpu", tier, shortfall=shortfall)
    from omnikv_runtime.planner import plan_memory
    from omnikv_runtime.planner.fit import available_memory, dense_twin, most_slots, shortfall_beside_weights

    config = engine.planner_config()
    gpu_free, host_free = available_memory(engine.device)
    gpu_free, host_free = max(gpu_free - prefix_bytes[0], 0), max(host_free - prefix_bytes[1], 0)
    mine = most_slots(engine.geometry, config, context, new_tokens, gpu_free, host_free, prefill_tokens=prefill_tokens)
    dense = most_slots(
        engine.geometry, dense_twin(config), context, new_tokens, gpu_free, host_free, prefill_tokens=prefill_tokens
    )
    shortfall = None
    if not mine["slots"]:
        plan = plan_memory(engine.geometry, config, context - new_tokens, 1, new_tokens, prefill_tokens=prefill_tokens)
        shortfall = shortfall_beside_weights(plan, config, gpu_free, host_free)
    return SlotCapacity(
        context, new_tokens, mine["slots"], mine["limited_by"], "cuda", _tier_words(config), dense["slots"], shortfall
    )


def describe_capacity(capacity: SlotCapacity, serving: int | None = None) -> str:
    """The start's line: how many requests of the context this machine holds, and a dense server's count."""
    stop = {"gpu": "GPU memory", "host": "host memory", "search limit": "the count's search limit"}[capacity.limited_by]
    where = "this GPU, beside the weights," if capacity.where == "cuda" else "this machine"
    text = (
        f"{where} holds {capacity.slots} concurrent requests of {capacity.context} tokens "
        f"({capacity.tier}; one more would not fit in {stop})"
    )
    if capacity.dense_slots is not None:
        text += f"; a dense server (every layer's KV on the GPU, no offload) would hold {capacity.dense_slots}"
    if serving is not None:
        text += f"; serving {serving}"
    return text


def auto_batch(capacity: SlotCapacity) -> int:
    """``--max-batch auto``: the planner's count, at most ``MAX_AUTO_BATCH``; ConfigError, naming what to change,
    when not even one request of the context fits."""
    if capacity.slots < 1:
        advice = (
            "lower --max-context; on CUDA with OmniKV, offload the sparse layers (offload.device = 'cpu'), store "
            "the host tier in FP8 (offload.host_dtype = 'float8_e4m3fn'), or use fewer filter and wait layers"
        )
        raise ConfigError(
            "max_batch",
            "auto",
            f"at least one slot: not even one request of {capacity.context} tokens fits "
            f"({capacity.shortfall or 'on another rank'}); "
            f"{advice}",
        )
    return min(capacity.slots, MAX_AUTO_BATCH)


def fewest_across_ranks(group: Any, device: torch.device, value: int) -> int:
    """The smallest of every rank's ``value`` (a collective: under tensor parallelism each rank counts its own
    free memory, and every rank must build the same slots)."""
    if group is None:
        return value
    tensor = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=group)
    return int(tensor.item())


def check_slots_fit(
    engine: Any,
    rows: int,
    context: int,
    new_tokens: int,
    prefix_bytes: tuple[int, int] = (0, 0),
    prefill_tokens: int | None = None,
) -> None:
    """Log how many slots of ``context`` tokens this machine holds beside the prefix cache's ``prefix_bytes``
    ``(GPU, host)``, turns prefilling ``prefill_tokens`` in one forward (:func:`describe_capacity`); raise
    ConfigError, saying what to lower, when ``rows`` slots and the prefix cache cannot fit: on CUDA as the memory
    planner sees it, on the CPU against the memory available now."""
    what = f"{rows} slots of {context} tokens"
    capacity = slot_capacity(engine, context, new_tokens, prefix_bytes, prefill_tokens)
    logger.info("capacity: %s", describe_capacity(capacity, rows))
    fit = f"{capacity.slots} fit, which --max-batch auto takes" if capacity.slots else "not even one fits"
    advice = "lower --max-batch or --max-context"
    if any(prefix_bytes):
        what += f" and a prefix cache of {sum(prefix_bytes) / 2**30:.2f} GiB"
        advice += ", or --prefix-cache-bytes"
    advice += f": {fit}"
    if engine.device.type == "cuda":
        try:
            engine.check_memory(
                rows,
                context - new_tokens,
                new_tokens,
                reserved=prefix_bytes,
                prefill_rows=1,
                prefill_tokens=prefill_tokens,
            )
        except PromptError as exc:
            raise ConfigError("serve", what, f"{exc} ({advice})") from None
        return
    needed = rows * _cpu_slot_bytes(engine, context, new_tokens) + sum(prefix_bytes)  # slots, prefixes
    available = psutil.virtual_memory().available
    if needed > CPU_SHARE * available:
        raise ConfigError(
            "serve", what, f"KV tiers of {needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available ({advice})"
        )


def check_ranks_agree(group: Any, device: torch.device, *values: int) -> None:
    """Raise ConfigError unless every rank built its scheduler with the same slots (a collective: every rank
    calls it while building its scheduler)."""
    mine = torch.tensor(values, dtype=torch.long, device=device)
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise ConfigError(
            "serve",
            f"slots, context, new tokens and prefix-cache blocks and block size from {low.tolist()} to "
            f"{high.tolist()} across the ranks",
            "the same --max-batch, --max-context, new tokens and --prefix-cache-bytes on every rank (start every "
            "rank with the same command)",
        )

"""What the server's scheduler checks as it is built: that its slots fit in memory, and, under tensor
parallelism, that every rank built the same slots (each rank holds its heads of every slot, and rank 0's
plans name slots by number)."""

from __future__ import annotations

from typing import Any

import psutil
import torch
import torch.distributed as dist

from omnikv_runtime.errors import ConfigError, PromptError
from omnikv_runtime.geometry import ModelGeometry


def check_slots_fit(
    engine: Any, rows: int, context: int, new_tokens: int, prefix_bytes: tuple[int, int] = (0, 0)
) -> None:
    """Raise ConfigError, saying what to lower, when ``rows`` slots of ``context`` tokens and the prefix cache's
    ``prefix_bytes`` ``(GPU, host)`` cannot fit: on CUDA as the memory planner sees it, on the CPU against the
    memory available now."""
    what = f"{rows} slots of {context} tokens"
    advice = "lower --max-batch or --max-context"
    if any(prefix_bytes):
        what += f" and a prefix cache of {sum(prefix_bytes) / 2**30:.2f} GiB"
        advice += ", or --prefix-cache-bytes"
    if engine.device.type == "cuda":
        try:
            engine.check_memory(rows, context - new_tokens, new_tokens, reserved=prefix_bytes)
        except PromptError as exc:
            raise ConfigError("serve", what, f"{exc} ({advice})") from None
        return
    geometry = ModelGeometry.from_model(engine.model)
    dtype_bytes = next(engine.model.parameters()).element_size()
    per_token = geometry.num_layers * geometry.kv_row_bytes(dtype_bytes)
    needed = rows * (context + 1 + new_tokens) * per_token + sum(prefix_bytes)  # every column, tail rings, prefixes
    available = psutil.virtual_memory().available
    if needed > 0.9 * available:
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

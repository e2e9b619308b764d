"""Tensor-parallel OmniKV through DeepSpeed's AutoTP.

With ``distributed.tp_size = N`` (the script started by ``deepspeed --num_gpus N`` or
``torchrun --nproc-per-node N``), each of the N ranks runs the whole model with 1/N of every
layer's heads and MLP columns: DeepSpeed's ``init_inference`` shards the linear layers and
all-reduces the attention output and MLP projections. The runtime's cache on each rank then holds,
in every tier, the KV of that rank's own KV heads only (its buffers take their shapes from the
keys they receive).

The filter layers must agree: a rank scores each context token by the maximum over its own
heads, and one all-reduce (MAX) over the tensor-parallel group gives every rank the scores of all
heads, hence the same top-k and the same rows to fetch from its own host tier, on its own
transfer stream. The all-reduce is an ordinary collective on the compute stream, so a CUDA graph
captures it with the rest of the decode step (NCCL supports capture).

On CPU the group uses gloo. DeepSpeed would route its all-reduces through a shared-memory kernel
that it compiles at start-up; that kernel crashed two-rank CPU runs (a segmentation fault), so it is
marked unavailable and DeepSpeed falls back to ``torch.distributed.all_reduce``.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from omnikv_runtime.config import OmniKVConfig
from omnikv_runtime.errors import ConfigError

logger = logging.getLogger(__name__)

LAUNCHERS = "`deepspeed --num_gpus N script.py` or `torchrun --nproc-per-node N script.py`"


def check_tensor_parallel(model: PreTrainedModel, tp_size: int) -> None:
    """Raise ConfigError unless ``tp_size`` splits the model's heads evenly (KV heads included)."""
    text = model.config.get_text_config(decoder=True)
    heads, kv_heads = text.num_attention_heads, getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    if kv_heads % tp_size or heads % tp_size:
        divisors = [d for d in range(1, kv_heads + 1) if kv_heads % d == 0 and heads % d == 0]
        raise ConfigError(
            "distributed.tp_size",
            tp_size,
            f"a divisor of the model's {kv_heads} KV heads and {heads} attention heads: one of {divisors} "
            "(each rank holds whole KV heads)",
        )


def _import_deepspeed():
    try:
        return importlib.import_module("deepspeed")
    except ImportError as exc:
        raise ConfigError(
            "distributed.tp_size",
            "> 1",
            "1, or install DeepSpeed for tensor parallelism (`pip install omnikv-runtime[deepspeed]`)",
        ) from exc


def _join_process_group(deepspeed: Any, backend: str, tp_size: int) -> None:
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "distributed.tp_size",
            tp_size,
            f"1 in a plain `python` run; for {tp_size} ranks start the script with {LAUNCHERS}",
        )
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":  # DeepSpeed's compiled shared-memory all-reduce crashes on CPU; plain gloo works
        ops = importlib.import_module("deepspeed.ops")
        ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if torch.cuda.is_available() and backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(dist_backend=backend)
    world = dist.get_world_size()
    if world != tp_size:
        raise ConfigError(
            "distributed.tp_size",
            tp_size,
            f"the number of ranks started ({world}): every rank of the run takes part in one tensor-parallel group",
        )


def tensor_parallel(model: PreTrainedModel, config: OmniKVConfig) -> PreTrainedModel:
    """The model sharded over ``config.distributed.tp_size`` ranks (itself when it is 1)."""
    tp_size = config.distributed.tp_size
    if tp_size == 1:
        return model
    check_tensor_parallel(model, tp_size)
    deepspeed = _import_deepspeed()
    _join_process_group(deepspeed, config.distributed.backend, tp_size)
    from omnikv_runtime.models import strip_quantization_leftovers

    strip_quantization_leftovers(model)  # DeepSpeed refuses models that carry an hf_quantizer
    dtype = next(model.parameters()).dtype
    engine = deepspeed.init_inference(
        model, tensor_parallel={"tp_size": tp_size}, dtype=dtype, replace_with_kernel_inject=False
    )
    logger.info("tensor parallel: rank %d of %d holds 1/%d of every layer's heads", dist.get_rank(), tp_size, tp_size)
    return engine.module


def tensor_parallel_group(config: OmniKVConfig) -> Any:
    """The process group whose ranks split the heads (the default group), or None without tensor parallelism."""
    return dist.group.WORLD if config.distributed.tp_size > 1 and dist.is_initialized() else None


def max_over_ranks(scores: torch.Tensor, group: Any) -> torch.Tensor:
    """Scores reduced over this rank's heads, combined (MAX) with the other ranks' in place."""
    if group is not None:
        dist.all_reduce(scores, op=dist.ReduceOp.MAX, group=group)
    return scores

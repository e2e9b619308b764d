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

In bf16, DeepSpeed's row-parallel layers (attention output, MLP down projection, LM head) round each
rank's partial sum to bf16 before the all-reduce, where one GPU rounds the whole sum once: near-tied
logits then flip. ``distributed.float32_partial_sums`` keeps the partial sums in float32 through the
all-reduce and rounds once (:func:`reduce_partial_sums_in_float32`).

On CPU the group uses gloo. DeepSpeed would route its all-reduces through a shared-memory kernel
that it compiles at start-up; that kernel crashed two-rank CPU runs (a segmentation fault), so it is
marked unavailable and DeepSpeed falls back to ``torch.distributed.all_reduce``.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from omnikv_runtime.config import OmniKVConfig
from omnikv_runtime.errors import ConfigError
from omnikv_runtime.geometry import ModelGeometry

logger = logging.getLogger(__name__)

LAUNCHERS = "`deepspeed --num_gpus N script.py` or `torchrun --nproc-per-node N script.py`"


def check_tensor_parallel(model: PreTrainedModel, tp_size: int) -> None:
    """Raise ConfigError unless ``tp_size`` splits the model's heads evenly (KV heads included)."""
    geometry = ModelGeometry.from_model(model)
    check_head_split(geometry.num_heads, geometry.kv_heads, tp_size)


def check_head_split(heads: int, kv_heads: int, tp_size: int) -> None:
    """Raise ConfigError unless ``tp_size`` divides both head counts (each rank holds whole KV heads)."""
    if kv_heads % tp_size or heads % tp_size:
        divisors = [d for d in range(1, kv_heads + 1) if kv_heads % d == 0 and heads % d == 0]
        raise ConfigError(
            "distributed.tp_size",
            tp_size,
            f"a divisor of the model's {kv_heads} KV heads and {heads} attention heads: one of {divisors} "
            "(each rank holds whole KV heads)",
        )


def _import_deepspeed(field: str = "distributed.tp_size", value: Any = "> 1", purpose: str = "tensor parallelism"):
    try:
        return importlib.import_module("deepspeed")
    except ImportError as exc:
        off = "1" if field == "distributed.tp_size" else "false"
        raise ConfigError(
            field, value, f"{off}, or install DeepSpeed for {purpose} (`pip install omnikv-runtime[deepspeed]`)"
        ) from exc


def _prepare_backend(backend: str) -> str:
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "gloo":  # DeepSpeed's compiled shared-memory all-reduce crashes on CPU; plain gloo works
        ops = importlib.import_module("deepspeed.ops")
        ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if torch.cuda.is_available() and backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return backend


def _join_process_group(deepspeed: Any, backend: str, tp_size: int) -> None:
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            "distributed.tp_size",
            tp_size,
            f"1 in a plain `python` run; for {tp_size} ranks start the script with {LAUNCHERS}",
        )
    backend = _prepare_backend(backend)
    deepspeed.init_distributed(dist_backend=backend)
    world = dist.get_world_size()
    if world != tp_size:
        raise ConfigError(
            "distributed.tp_size",
            tp_size,
            f"the number of ranks started ({world}): every rank of the run takes part in one tensor-parallel group",
        )


def _refuse_both(config: OmniKVConfig) -> None:
    section = config.distributed
    if section.offload_weights and section.tp_size > 1:
        raise ConfigError(
            "distributed.offload_weights",
            True,
            f"false with distributed.tp_size = {section.tp_size}: ZeRO-Inference here offloads one rank's weights; "
            "use tensor parallelism or weight offload, not both",
        )


def float32_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's float32 buffers (a Llama's rotary ``inv_freq``), to put back after DeepSpeed.

    DeepSpeed casts every floating-point buffer to the weights' dtype (``init_inference``'s ``dtype``,
    ZeRO's bf16 mode). transformers keeps the rotary inverse frequencies in float32: in bfloat16 each
    frequency is off by up to 2**-9 of itself, so at position 131,072 a rotation angle is off by up to
    about 256 radians, and queries and keys come out rotated at random. Measured on two H200s before
    this was restored: two ranks gave other tokens than one GPU from the first step at 128K, and their
    selected tokens overlapped one GPU's by 7% (chance)."""
    return {name: buffer.detach().clone() for name, buffer in model.named_buffers() if buffer.dtype == torch.float32}


def restore_float32_buffers(model: torch.nn.Module, kept: dict[str, torch.Tensor]) -> int:
    """Put back the float32 buffers that DeepSpeed cast (on the device each is on now); returns how many."""
    restored = 0
    for name, value in kept.items():
        prefix, _, attribute = name.rpartition(".")
        owner = model.get_submodule(prefix) if prefix else model
        current = owner._buffers.get(attribute)
        if current is not None and current.dtype != torch.float32:
            owner._buffers[attribute] = value.to(current.device)
            restored += 1
    return restored


def tensor_parallel(model: PreTrainedModel, config: OmniKVConfig) -> PreTrainedModel:
    """The model sharded over ``config.distributed.tp_size`` ranks (itself when it is 1)."""
    _refuse_both(config)
    tp_size = config.distributed.tp_size
    if tp_size == 1:
        return model
    check_tensor_parallel(model, tp_size)
    deepspeed = _import_deepspeed()
    _join_process_group(deepspeed, config.distributed.backend, tp_size)
    from omnikv_runtime.models import strip_quantization_leftovers

    strip_quantization_leftovers(model)  # DeepSpeed refuses models that carry an hf_quantizer
    dtype = next(model.parameters()).dtype
    kept = float32_buffers(model)
    engine = deepspeed.init_inference(
        model, tensor_parallel={"tp_size": tp_size}, dtype=dtype, replace_with_kernel_inject=False
    )
    restore_float32_buffers(engine.module, kept)
    if config.distributed.float32_partial_sums:
        reduce_partial_sums_in_float32(engine.module)
    logger.info("tensor parallel: rank %d of %d holds 1/%d of every layer's heads", dist.get_rank(), tp_size, tp_size)
    return engine.module


# DeepSpeed AutoTP's row-parallel layers: each rank multiplies its slice of the input features by its
# columns of the weight, and the all-reduce sums the ranks' partial outputs. The LM head's class takes
# the whole hidden state and slices it itself.
ROW_PARALLEL_CLASSES = ("LinearAllreduce", "LmHeadLinearAllreduce")


def reduce_partial_sums_in_float32(model: torch.nn.Module) -> int:
    """Make AutoTP's row-parallel layers sum in float32 across the ranks; returns how many layers changed.

    Each such layer then computes its partial product with a float32 output (on CUDA one GEMM with bf16
    inputs and a float32 result, as cuBLAS accumulates anyway), all-reduces that in float32, adds the
    bias and rounds once to the weights' dtype. One GPU rounds its whole sum once too, so the result
    differs from one GPU's only where float32 sums taken in another order round to another bf16 value.
    Layers whose weights are float32 already are left as they are. Every rank must call this (one
    all-gather of the layers' widths).
    """
    layers = [(name, module) for name, module in model.named_modules() if _row_parallel(name, module)]
    layers = [(name, module) for name, module in layers if module.weight.dtype != torch.float32]
    if not layers:
        return 0
    device = layers[0][1].weight.device
    group = layers[0][1].mp_group
    widths = torch.tensor([module.weight.shape[-1] for _, module in layers], device=device)
    every = [torch.empty_like(widths) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, widths, group=group)
    rank = dist.get_rank(group)
    offsets = torch.stack(every[:rank]).sum(dim=0).tolist() if rank else [0] * len(layers)
    product = _float32_product(device)
    for (_, module), offset in zip(layers, offsets, strict=True):
        module.forward = functools.partial(_row_parallel_float32, module, offset, product)
    logger.info("tensor parallel: %d row-parallel layers all-reduce float32 partial sums", len(layers))
    return len(layers)


def _row_parallel(name: str, module: torch.nn.Module) -> bool:
    """Whether ``module`` is one of AutoTP's row-parallel layers (ConfigError for a kind not handled here)."""
    classes = [cls.__name__ for cls in type(module).__mro__]
    if "LinearAllreduce" not in classes:
        return False
    if classes[0] not in ROW_PARALLEL_CLASSES:
        raise ConfigError(
            "distributed.float32_partial_sums",
            True,
            f"false for this model: its layer {name} is DeepSpeed's {classes[0]}, and the float32 reduction "
            f"handles {' and '.join(ROW_PARALLEL_CLASSES)} only",
        )
    return True


def _float32_product(device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``(features, weight) -> features @ weight.T`` in float32: on CUDA one GEMM with a float32 output."""
    if device.type == "cuda":
        probe = torch.ones(1, 1, dtype=torch.bfloat16, device=device)
        try:
            torch.mm(probe, probe, out_dtype=torch.float32)
            return lambda features, weight: torch.mm(features, weight.t(), out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):
            logger.warning("this torch has no GEMM with a float32 output: the row-parallel inputs are cast first")
    return lambda features, weight: torch.mm(features.float(), weight.t().float())


def _row_parallel_float32(
    module: torch.nn.Module,
    offset: int,
    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    features: torch.Tensor,
) -> torch.Tensor:
    """A row-parallel layer's forward with a float32 partial sum and all-reduce, rounded once at the end."""
    width = module.weight.shape[-1]
    if features.shape[-1] != width:  # the LM head takes the whole hidden state: this rank's columns of it
        features = features[..., offset : offset + width]
    summed = product(features.reshape(-1, width), module.weight)
    dist.all_reduce(summed, group=module.mp_group)
    if module.bias is not None:
        summed = summed + module.bias.float()
    return summed.to(features.dtype).reshape(*features.shape[:-1], summed.shape[-1])


def tensor_parallel_group(config: OmniKVConfig) -> Any:
    """The process group whose ranks split the heads (the default group), or None without tensor parallelism."""
    return dist.group.WORLD if config.distributed.tp_size > 1 and dist.is_initialized() else None


def leave_process_group() -> None:
    """At the end of a run of several ranks: wait for every rank, then destroy the process group (a rank that
    exits while another still uses the group can abort in gloo's teardown, and the launcher then stops the
    others)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def zero_inference_config(dtype: torch.dtype, hidden: int, pin_memory: bool) -> dict[str, Any]:
    """DeepSpeed's ZeRO-Inference config: stage-3 parameters offloaded to (pinned) host memory.

    Parameters of at most ``hidden`` elements (the norms) stay resident; the prefetch bucket and
    the live-parameter cap are two ``hidden x hidden`` matrices, as DeepSpeed's ZeRO-Inference
    example sets them. There is no optimizer: only the parameter partitioning and fetch hooks run.
    """
    return {
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "cpu", "pin_memory": pin_memory},
            "stage3_param_persistence_threshold": hidden,
            "stage3_prefetch_bucket_size": 2 * hidden * hidden,
            "stage3_max_live_parameters": 2 * hidden * hidden,
        },
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "train_micro_batch_size_per_gpu": 1,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _join_single_rank(deepspeed: Any, backend: str) -> None:
    """A one-rank process group for ZeRO-3 (a plain `python` run starts one itself)."""
    backend = _prepare_backend(backend)
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:  # what a launcher would set, for one rank
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        launcher = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
        for name, value in {**launcher, "MASTER_PORT": str(port)}.items():
            os.environ.setdefault(name, value)
    deepspeed.init_distributed(dist_backend=backend)
    if dist.get_world_size() != 1:
        raise ConfigError(
            "distributed.offload_weights",
            True,
            f"false in a run of {dist.get_world_size()} ranks: ZeRO-Inference weight offload runs one rank "
            "(start it with plain `python`, or one process)",
        )


def offload_weights(model: PreTrainedModel, config: OmniKVConfig) -> PreTrainedModel:
    """The model under ZeRO-Inference when ``distributed.offload_weights`` is set (else itself).

    Its parameters move to host memory (pinned on CUDA); DeepSpeed's hooks fetch each module's
    weights to the GPU just before it runs and release them after, so the GPU holds about one
    layer's weights at a time besides OmniKV's KV tiers.
    """
    section = config.distributed
    if not section.offload_weights:
        return model
    _refuse_both(config)
    deepspeed = _import_deepspeed("distributed.offload_weights", True, "ZeRO-Inference weight offload")
    _join_single_rank(deepspeed, section.backend)
    from omnikv_runtime.models import strip_quantization_leftovers

    strip_quantization_leftovers(model)
    dtype = next(model.parameters()).dtype
    hidden = ModelGeometry.from_model(model).hidden
    ds_config = zero_inference_config(dtype, hidden, pin_memory=torch.cuda.is_available())
    kept = float32_buffers(model)
    # partition the parameters into host memory first: DeepSpeed moves a model it did not partition
    # to the GPU whole before it offloads anything (weights larger than the GPU never get that far)
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config, remote_device="cpu", dtype=dtype)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    restore_float32_buffers(engine.module, kept)
    engine.module.eval()
    logger.info("ZeRO-Inference: weights offloaded to host memory, fetched layer by layer")
    return engine.module


def execution_device(model: PreTrainedModel, config: OmniKVConfig) -> torch.device:
    """Where the model computes: its parameters' device, or this rank's accelerator under ZeRO-Inference
    (whose partitioned parameters are empty placeholders)."""
    if config.distributed.offload_weights:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return next(model.parameters()).device

"""The memory planner: bytes of weights, KV tiers and activations before anything is allocated.

OmniKV (Hao et al., "OmniKV: Dynamic Context Selection for Efficient Long-Context LLMs", ICLR 2025)
keeps the full KV of every token but only the filter, wait and early layers hold it on the GPU; the
sparse layers' KV lives in a host tier and a budget of selected rows is fetched each step. This
module turns a model's geometry and a runtime config into the bytes each tier needs, mirroring what
:class:`~omnikv_runtime.cache.adapter.OmniKVCache` allocates (dense buffers of ``prompt + new`` tokens, sparse
working buffers grown by doubling, host arenas ``[batch, capacity, segment layers, 2, kv_heads,
head_dim]``, a hot cache of ``offload.hot_cache_tokens`` rows per segment in the same packed layout),
the host tier in ``offload.host_dtype`` (FP8 codes plus a float32 scale per token, layer and KV head),
plus an estimate of transformers' sdpa activations. The geometry (:class:`ModelGeometry`, read from a
config.json or a known name) lives in :mod:`omnikv_runtime.geometry`. :mod:`omnikv_runtime.planner.fit` answers whether
a run fits and the longest context that does.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from omnikv_runtime.config import OmniKVConfig
from omnikv_runtime.distributed import check_head_split
from omnikv_runtime.errors import ConfigError
from omnikv_runtime.geometry import KNOWN_GEOMETRIES, ModelGeometry, hf_config_dict, resolve_geometry
from omnikv_runtime.layout import LayerPlan, reserve_tokens, tail_ring_tokens
from omnikv_runtime.transfer.fp8 import packed_row_bytes
from omnikv_runtime.transfer.host_arena import allocation_bytes

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
HOT_CACHE_STATE_BYTES = 8  # eviction state per hot-cache slot and batch row (LFU: two float32)


def parse_bytes(text: str | int | float, what: str = "memory") -> int:
    """``"80GB"`` (10^9), ``"80GiB"`` (2^30), ``"512MB"`` or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ConfigError(what, text, "a size such as 80GB, 80GiB, 512MB or a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def arena_rows(context: int, new_tokens: int, chunk_size: int | None) -> int:
    """Token capacity of a host arena: the reserve (prompt + new, rounded up), or the first prefill chunk if larger."""
    first_chunk = min(chunk_size or context, context)
    return max(reserve_tokens(context, new_tokens), first_chunk, 1)


@dataclass
class MemoryPlan:
    """Bytes of one run. ``gpu`` and ``host`` are what each memory must hold at its peak."""

    context: int
    new_tokens: int
    batch: int
    omnikv: bool
    offload: str
    dtype_bytes: int
    layers: dict[str, int]
    budget: int
    weights: int
    tiers: dict[str, int] = field(default_factory=dict)
    activations: dict[str, int] = field(default_factory=dict)
    gpu: int = 0
    host: int = 0
    host_dtype: str = "auto"  # the host tier's storage: "auto" (the model's dtype) or "float8_e4m3fn"
    host_bytes_per_token: int = 0  # one token of every sparse layer in the host tier, whole batch (scales included)
    tp_size: int = 1  # GPUs splitting the heads: every GPU figure is per GPU, ``host`` is the whole host's
    weights_offloaded: bool = False  # ZeRO-Inference: the weights live in host memory, ``weights`` is what is in flight
    weights_host: int = 0  # bytes of weights in (pinned) host memory
    host_per_rank: int = 0  # one rank's pinned KV tier (and weights when offloaded)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plan_memory(
    geometry: ModelGeometry,
    config: OmniKVConfig,
    context: int,
    batch: int = 1,
    new_tokens: int | None = None,
    dtype: str | None = None,
    prefill: bool = True,
    prefill_rows: int | None = None,
    prefill_tokens: int | None = None,
) -> MemoryPlan:
    """The bytes a ``generate`` of ``context`` prompt tokens + ``new_tokens`` would need, per tier.

    Tier figures mirror the cache: ``gpu_dense`` (allocated, the reserve: ``prompt + new`` rounded up
    to 256, per dense layer), ``gpu_selected`` (offload: each sparse layer's staging buffer of budget
    rows; in GPU mode attention reads the selected rows in place), ``gpu_tail`` (the tail ring: its
    slots per sparse layer), ``gpu_hot`` (the hot caches with their token maps; ``gpu_hot_state`` adds
    the eviction policy's per-slot state) and ``host`` /
    ``host_allocated`` (arenas of the sparse layers; on the GPU when ``offload.device`` is ``none``), and
    ``host_reserved``: the memory they pin, exactly (each arena is mapped at its size and registered
    with CUDA; what ``host`` totals, and what must fit the host's memory). With ``offload.host_dtype =
    "float8_e4m3fn"`` the host tiers hold one byte per value plus a float32 scale per ``head_dim``
    values; the GPU tiers stay in the model's dtype.
    ``prefill=False`` plans a cache filled directly (no prefill activations), as the capacity benchmark does.
    ``prefill_rows`` is how many rows are prefilled together (default: the batch; a server prefills each
    request alone, its chunks at most one chunk's tokens a turn, however many slots decode together).
    ``prefill_tokens`` is how many prompt tokens one prefill forward carries (default: one chunk,
    ``prefill.chunk_size``); a server packing several requests' chunks into one forward carries up to its
    turn budget, each request's part still at most one chunk.

    With ``distributed.tp_size = N`` every GPU figure is one rank's: its ``kv_heads / N`` KV heads in
    every tier, its share of the weights (:meth:`ModelGeometry.rank_param_count`) and its activations;
    ``host`` is the whole host's (N host tiers, each 1/N of one GPU's) and ``host_per_rank`` one
    rank's. With ``distributed.offload_weights`` (ZeRO-Inference) the weights are in pinned host
    memory (``weights_host``, counted in ``host``) and ``weights`` is what the GPU holds of them at a time.
    """
    new_tokens = config.generation.max_new_tokens if new_tokens is None else new_tokens
    if context < 1 or batch < 1 or new_tokens < 1:
        raise ConfigError("plan", (context, batch, new_tokens), "context, batch and new tokens of at least 1")
    dtype_bytes = DTYPE_BYTES[dtype or config.model.dtype]
    tp_size, offloaded = config.distributed.tp_size, config.distributed.offload_weights
    check_head_split(geometry.num_heads, geometry.kv_heads, tp_size)
    full, geometry = geometry, geometry.shard(tp_size)  # from here on: what one rank holds and computes
    section = config.omnikv
    plan = LayerPlan.build(geometry.num_layers, section.filter_layers, section.wait_layers, section.enabled)
    row = batch * geometry.kv_row_bytes(dtype_bytes)  # one token, one layer, whole batch
    host_dtype = config.offload.host_dtype  # "auto" unless offload.device = "cpu" (the config's rule)
    quantized = host_dtype != "auto"
    host_row = batch * packed_row_bytes(1, geometry.kv_heads, geometry.head_dim, dtype_bytes, quantized)
    reserve = reserve_tokens(context, new_tokens)
    stored = context + new_tokens - 1  # generate feeds every token but the last
    sparse = len(plan.sparse_layers)
    dense = geometry.num_layers - sparse
    budget = section.token_budget_for(context) if sparse else 0
    decode_steps = new_tokens - 1
    staged = decode_steps and config.offload.device == "cpu"
    ring = tail_ring_tokens(section.tail_tokens, reserve, context)
    tiers = {
        "gpu_dense": dense * max(reserve, 16) * row,
        "gpu_selected": sparse * budget * row if staged else 0,
        "gpu_tail": sparse * ring * row if decode_steps else 0,
        "host": sparse * stored * host_row,
        "host_allocated": sparse * arena_rows(context, new_tokens, config.prefill.chunk_size) * host_row,
    }
    arena_tokens = arena_rows(context, new_tokens, config.prefill.chunk_size)
    heads, dim = geometry.kv_heads, geometry.head_dim
    tiers["host_reserved"] = sum(
        allocation_bytes(batch, arena_tokens, len(s.sparse_layers), heads, dim, dtype_bytes, quantized)
        for s in plan.segments
        if s.sparse_layers
    )
    hot = config.offload.hot_cache_tokens  # 0 unless offload.device = "cpu"
    hot_segments = [len(s.sparse_layers) for s in plan.segments if s.sparse_layers] if hot else []
    # per segment: packed rows [batch, slots + 1, layers, 2, kv_heads, head_dim], int64 token of each slot,
    # int64 slot of each arena token; the eviction policy's float32 state per slot (up to two, LFU)
    tiers["gpu_hot"] = sum(
        batch * (hot + 1) * (layers * geometry.kv_row_bytes(dtype_bytes) + 8) + batch * (arena_tokens + 1) * 8
        for layers in hot_segments
    )
    tiers["gpu_hot_state"] = len(hot_segments) * batch * (hot + 1) * HOT_CACHE_STATE_BYTES
    result = MemoryPlan(
        context=context,
        new_tokens=new_tokens,
        batch=batch,
        omnikv=section.enabled,
        offload=config.offload.device,
        dtype_bytes=dtype_bytes,
        layers={"dense": dense, "sparse": sparse, "total": geometry.num_layers},
        budget=budget,
        weights=(full.zero_inference_gpu_params() if offloaded else full.rank_param_count(tp_size)) * dtype_bytes,
        tiers=tiers,
        activations=_activations(
            geometry, config, context, batch, prefill_rows or batch, prefill_tokens, dtype_bytes, plan, budget
        ),
    )
    if not prefill:
        result.activations["prefill"] = 0
    gpu_kv = sum(tiers[name] for name in ("gpu_dense", "gpu_selected", "gpu_tail", "gpu_hot", "gpu_hot_state"))
    on_gpu_host = config.offload.device == "none"
    if on_gpu_host:
        gpu_kv += tiers["host_allocated"]
    result.gpu = result.weights + gpu_kv + max(result.activations.values())
    result.tp_size, result.weights_offloaded = tp_size, offloaded
    result.weights_host = full.param_count() * dtype_bytes if offloaded else 0
    result.host_per_rank = (0 if on_gpu_host else tiers["host_reserved"]) + result.weights_host
    result.host = tp_size * result.host_per_rank
    result.host_dtype = host_dtype
    result.host_bytes_per_token = sparse * host_row
    return result


def _activations(
    geometry: ModelGeometry,
    config: OmniKVConfig,
    context: int,
    batch: int,
    prefill_rows: int,
    prefill_tokens: int | None,
    dtype_bytes: int,
    plan: LayerPlan,
    budget: int,
) -> dict[str, int]:
    """Peak transient bytes of one prefill chunk and of one decode step (transformers' sdpa path, CUDA).

    Prefill, last chunk of ``c`` tokens over ``L`` cached ones, in a forward of ``t`` tokens (``c``, or a packed
    turn's ``prefill_tokens``: several requests' chunks, each at most ``c``): hidden states and q/k/v/RoPE copies
    of ``t`` tokens, then the larger of the MLP (gate, up, product: ``3 t × intermediate``) and attention. A dense
    layer's chunk attends to its KV in place (fused kernels, grouped heads, no mask), unless the rows
    may be padded (a batch of several): then the ``[c, L]`` bool mask and its float copy, and K/V
    repeated to every query head. A sparse layer's chunk reads its earlier tokens back from the host
    tier ``prefill.read_block_tokens`` at a time: the block being computed and its contiguous copy,
    the next one being read and the next sparse layer's first block (``4 × block`` tokens, whatever
    ``L``), the float32
    running output, the block's and their weighted sum, and for rows that may be padded the block's
    float32 scores and weights (a masked block is computed without a fused kernel). A single-chunk
    prefill has no past. Decode: a filter layer's logits over every context key (in the keys' dtype for
    half precision, then float32 copies), plus the LM head's logits.
    """
    g, b, d = geometry, prefill_rows, dtype_bytes
    chunk = min(config.prefill.chunk_size or context, context, prefill_tokens or context)
    tokens = prefill_tokens or chunk  # one forward's: a packed turn's may exceed one request's context
    past = context - chunk
    projections = tokens * (g.num_heads + 2 * g.kv_heads) * g.head_dim * d * 2
    attention = projections
    padded = b > 1  # one row is never padded; the rows of a batch may be
    if past and padded:
        attention += chunk * context * (1 + d)
        attention += 2 * g.num_heads * context * g.head_dim * d
    if past and plan.sparse_layers:
        block = min(config.prefill.read_block_tokens, past)
        # read back: the block computed, its contiguous copy for the fused kernel, the next block and the next
        # sparse layer's first in flight; with the arena on the GPU ("none") blocks are views, copied once
        blocks = (4 if config.offload.device == "cpu" else 1) * block * g.kv_row_bytes(d)
        merged = 3 * chunk * g.num_heads * g.head_dim * 4
        scores = 2 * g.num_heads * chunk * block * 4 if padded else 0
        attention = max(attention, projections + blocks + merged + scores)
    prefill = b * (tokens * g.hidden * d * 4 + max(3 * tokens * g.intermediate * d, attention))
    b = batch  # every row decodes together
    decode_core = b * (g.hidden * d * 4 + 3 * g.intermediate * d + g.vocab * (d + 8))
    selection = 0
    if plan.sparse_layers:
        keys_copy = 0 if d == 2 else g.kv_heads * context * g.head_dim * 4
        selection = b * (keys_copy + g.num_heads * context * (d + 12) + 2 * context * 4 + budget * 16)
    return {"prefill": prefill, "decode": decode_core + selection}


__all__ = [
    "KNOWN_GEOMETRIES",
    "MemoryPlan",
    "ModelGeometry",
    "arena_rows",
    "hf_config_dict",
    "parse_bytes",
    "plan_memory",
    "resolve_geometry",
]

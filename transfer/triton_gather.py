"""The GPU's reads and writes of the host tier, with Triton: a gather of selected token rows straight
from pinned host memory, and the writes of a prefill chunk or a decode step's token into it.

The host tier is token-major (``[batch, tokens, row]``, one row = every sparse layer of a segment,
keys and values), so a selected token is one contiguous read; one layer's slice of a row is too.
:func:`gather_rows` reads those rows through unified virtual addressing (pinned host memory is
addressable from the GPU) at indices that stay on the GPU, into a GPU buffer ``[batch, k, row]``. It is
persistent and narrow: ``num_programs`` CTAs (about 32) loop over the rows. Measured on an H100 (a
201 MB gather next to two 8192-cubed matmuls), 32 CTAs reach the PCIe link's bandwidth and leave the
rest of the GPU to compute on another stream, where one CTA per row serialises with it.
:func:`scatter_rows` (a prefill chunk) and :func:`copy_row` (a decode step's token, at a device-side
position) store into the tier. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (how CI
tests them).

Each kernel has a ``QUANTIZED`` variant (a compile-time flag, chosen by passing ``scales``) for an FP8
tier (:mod:`omnikv_runtime.transfer.fp8`: one-byte codes, a float32 scale per head): writes quantize
before the bytes cross PCIe, the gather dequantizes into the output's dtype, so PCIe carries FP8 bytes
and the GPU's buffers stay in the model's dtype. The quantized variant moves tiles of whole heads
(``GROUPS`` heads of ``DIM`` values) so that a row's scales are one short contiguous read; the plain
variant moves flat tiles of ``BLOCK`` values. What does not depend on the tile (the launch and its
checks, the persistent loop, the row, index and hot-slot addressing) is written once; each variant's
tile step is written out in its branch. Arguments a variant does not read are passed as None, a
constexpr to Triton that adds no kernel parameter, so the plain variant compiles exactly as it would
without the flag. The plain tile steps call no ``@triton.jit`` helper: an inlined call leaves
debug-line labels in the PTX that ptxas schedules around (it changed the plain gather's SASS with the
hot cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omnikv_runtime.kernels.triton_support import index_stride
from omnikv_runtime.transfer.triton_fp8 import fp8_decode, quantize_groups, store_quantized

DEFAULT_PROGRAMS = 32
MAX_BLOCK = 4096  # elements of one row per inner step (per program and step of a write)
TILE_ELEMENTS = 8192  # elements in flight per CTA per step (rows x block)
QUANTIZED_GATHER_WARPS = 8  # 8K values per step: with 4 warps the decoding spills registers (ptxas, sm_90)


@triton.jit
def _gather_rows_kernel(
    source,  # [batch, tokens, row], host (pinned) or device; rows contiguous, other strides free (QUANTIZED: uint8)
    scales,  # QUANTIZED: [batch, tokens, groups] float32, rows contiguous
    indices,  # [batch, k] int64, device: token to read from source (-1: the hot slot instead; no hot: nothing)
    target,  # [batch, k, row], device; rows contiguous
    hot,  # [batch, slots + 1, row], device (HOT only)
    hot_slots,  # [batch, k] int64, device (HOT only): slot a hit reads or a miss fills
    rows_total,  # batch * k
    k,
    row_elems,
    groups,  # QUANTIZED: groups (heads) of dim values per row, one scale each
    dim,
    source_batch_stride,
    source_row_stride,
    scales_batch_stride,
    scales_row_stride,
    target_batch_stride,
    target_row_stride,
    hot_batch_stride,
    hot_row_stride,
    ROWS: tl.constexpr,  # rows in flight per iteration: small rows need several to fill the link
    BLOCK: tl.constexpr,  # elements per row per inner step (plain)
    GROUPS: tl.constexpr,  # heads per row per inner step (QUANTIZED)
    DIM: tl.constexpr,  # dim padded to a power of two (QUANTIZED)
    HOT: tl.constexpr,  # delta fetch through a hot cache
    QUANTIZED: tl.constexpr,  # source holds FP8 codes and scales; dequantize into target's dtype
):
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    row_offsets = tl.arange(0, ROWS)
    if QUANTIZED:
        group_offsets = tl.arange(0, GROUPS)
        columns = tl.arange(0, DIM)
    else:
        columns = tl.arange(0, BLOCK)
    for first in range(program * ROWS, rows_total, programs * ROWS):
        jobs = tl.cast(first, tl.int64) + row_offsets  # int64: host arenas pass 2**31 elements
        live = jobs < rows_total
        batch_row = jobs // k
        tokens = tl.load(indices + jobs, mask=live, other=0).to(tl.int64)
        from_source = live & (tokens >= 0)
        if QUANTIZED:
            token = tl.maximum(tokens, 0)
            source_rows = source + batch_row * source_batch_stride + token * source_row_stride
            scale_rows = scales + batch_row * scales_batch_stride + token * scales_row_stride
        else:
            source_rows = source + batch_row * source_batch_stride + tl.maximum(tokens, 0) * source_row_stride
        target_rows = target + batch_row * target_batch_stride + (jobs % k) * target_row_stride
        if HOT:
            slots = tl.load(hot_slots + jobs, mask=live, other=0).to(tl.int64)
            hot_rows = hot + batch_row * hot_batch_stride + slots * hot_row_stride
            from_hot = live & (tokens < 0)
            written = live
        else:
            written = from_source  # a -1 lane without a hot cache reads nothing and writes nothing
        if QUANTIZED:
            for start in range(0, groups, GROUPS):
                group = start + group_offsets
                cells = (group[:, None] * dim + columns[None, :])[None, :, :]  # [1, GROUPS, DIM]
                inside = ((group < groups)[:, None] & (columns < dim)[None, :])[None, :, :]
                read = from_source[:, None, None] & inside
                codes = tl.load(source_rows[:, None, None] + cells, mask=read, other=0)
                scale_mask = from_source[:, None] & (group < groups)[None, :]
                scale = tl.load(scale_rows[:, None] + group[None, :], mask=scale_mask, other=0.0)
                values = (fp8_decode(codes) * scale[:, :, None]).to(target.dtype.element_ty)
                if HOT:
                    cached = tl.load(hot_rows[:, None, None] + cells, mask=from_hot[:, None, None] & inside)
                    values = tl.where(from_hot[:, None, None], cached, values)
                    tl.store(hot_rows[:, None, None] + cells, values, mask=read)  # a miss lands in its slot too
                tl.store(target_rows[:, None, None] + cells, values, mask=written[:, None, None] & inside)
        else:
            for start in range(0, row_elems, BLOCK):
                offsets = start + columns
                inside = (offsets < row_elems)[None, :]
                values = tl.load(source_rows[:, None] + offsets[None, :], mask=from_source[:, None] & inside)
                if HOT:
                    cached = tl.load(hot_rows[:, None] + offsets[None, :], mask=from_hot[:, None] & inside)
                    values = tl.where(from_hot[:, None], cached, values)
                    # a miss lands in its slot too (uncached misses and hits write nowhere useful: the scratch row)
                    tl.store(hot_rows[:, None] + offsets[None, :], values, mask=from_source[:, None] & inside)
                tl.store(target_rows[:, None] + offsets[None, :], values, mask=written[:, None] & inside)


def _rows_contiguous(tensor: torch.Tensor) -> bool:
    """True when each ``tensor[b, t]`` row is one contiguous run of elements."""
    if tensor.numel() == 0 or tensor.dim() < 3:
        return True
    return tensor[0, 0].is_contiguous()


def _flat_tiles(row_elems: int, block: int) -> dict[str, int | None]:
    """The plain variant's tile arguments: ``BLOCK`` of a row's ``row_elems`` values per step. The quantized
    variant's are None: a constexpr to Triton, so they add no kernel parameter and no code."""
    return {"row_elems": row_elems, "BLOCK": block, "groups": None, "dim": None, "GROUPS": None, "DIM": None}


def _head_tiles(row_elems: int, dim: int) -> dict[str, int | None]:
    """The quantized variant's tile arguments: a row's ``groups`` of ``dim`` values (one scale each),
    ``GROUPS`` whole groups per step (as many as fit ``MAX_BLOCK`` values, at least one), ``dim`` padded to
    ``DIM``, a power of two. The plain variant's are None."""
    groups = row_elems // dim
    padded = triton.next_power_of_2(dim)
    per_step = max(1, min(triton.next_power_of_2(groups), MAX_BLOCK // padded))
    return {"row_elems": None, "BLOCK": None, "groups": groups, "dim": dim, "GROUPS": per_step, "DIM": padded}


def _scale_arguments(scales: torch.Tensor | None) -> dict[str, torch.Tensor | int | None]:
    """The FP8 tier's scales ``[batch, tokens, ...]`` as kernel arguments; all None for a plain tier."""
    if scales is None:
        return {"scales": None, "scales_batch_stride": None, "scales_row_stride": None}
    return {"scales": scales, "scales_batch_stride": scales.stride(0), "scales_row_stride": scales.stride(1)}


def gather_rows(
    source: torch.Tensor,
    indices: torch.Tensor,
    out: torch.Tensor,
    num_programs: int = DEFAULT_PROGRAMS,
    hot: torch.Tensor | None = None,
    hot_slots: torch.Tensor | None = None,
    tile_elements: int = TILE_ELEMENTS,
    scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[b, j] = source[b, indices[b, j]]`` for rows of any shape, by the persistent kernel.

    Args:
        source: ``[batch, tokens, *row]`` (a host arena, or one layer's slice of its packed rows):
            each row contiguous, batch and token strides free.
        indices: ``[batch, k]`` integer token indices (on the GPU; never copied to the host). Without a hot
            cache, a lane of -1 reads nothing and leaves its ``out`` row as it was (a padding lane).
        out: ``[batch, k, *row]`` output, same dtype as ``source``, rows contiguous (a layer's
            slice of a packed staging buffer is fine).
        num_programs: CTAs of the persistent launch; few enough to leave SMs to compute.
        hot, hot_slots: delta fetch through a hot cache ``[batch, slots + 1, *row]``: where
            ``indices`` is -1 the row is read from ``hot[b, hot_slots[b, j]]`` instead of
            ``source``; every row read from ``source`` is also stored at ``hot[b, hot_slots[b, j]]``
            (point uncached misses at the scratch slot).
        tile_elements: elements in flight per CTA and step (rows x block); small rows need more rows.
        scales: an FP8 source: ``source`` holds float8_e4m3fn codes ``[batch, tokens, *row, head_dim]``
            and ``scales`` their float32 scales ``[batch, tokens, *row]`` (each row contiguous);
            ``out`` (and ``hot``) receive the dequantized values in their own dtype.
    """
    batch, k = indices.shape
    quantized = scales is not None
    dtype_ok = out.dtype.is_floating_point if quantized else out.dtype == source.dtype
    if out.shape[:2] != (batch, k) or out.shape[2:] != source.shape[2:] or not dtype_ok:
        raise ValueError(
            f"out {tuple(out.shape)} {out.dtype} does not fit rows of {tuple(source.shape)} {source.dtype}"
        )
    if not (_rows_contiguous(out) and _rows_contiguous(source)):
        raise ValueError("gather_rows needs each row of the source and of the output to be contiguous")
    use_hot = hot is not None
    if use_hot and (hot.shape[2:] != source.shape[2:] or not _rows_contiguous(hot) or hot_slots.shape != (batch, k)):
        raise ValueError(f"hot cache {tuple(hot.shape)} does not fit rows of {tuple(source.shape)}")
    if use_hot and hot.dtype != out.dtype:
        raise ValueError(f"hot cache {hot.dtype} and output {out.dtype} differ")
    if quantized and (
        scales.shape != source.shape[:-1] or scales.dtype != torch.float32 or not _rows_contiguous(scales)
    ):
        raise ValueError(f"scales {tuple(scales.shape)} {scales.dtype} do not fit codes {tuple(source.shape)}")
    row_elems = source[0, 0].numel() if source.shape[0] and source.shape[1] else 0
    if batch * k == 0 or row_elems == 0:
        return out
    block = min(MAX_BLOCK, triton.next_power_of_2(row_elems))
    rows = max(1, min(64, tile_elements // block))  # about 8K elements (16 KB of bf16) in flight per CTA
    programs = max(1, min(num_programs, triton.cdiv(batch * k, rows)))
    tiles = _head_tiles(row_elems, source.shape[-1]) if quantized else _flat_tiles(row_elems, block)
    if quantized:  # a tile of whole heads is at least as wide as the flat block: fewer rows, on as many CTAs
        rows = max(1, min(64, tile_elements // (tiles["GROUPS"] * tiles["DIM"])))
    indices = indices.contiguous()
    _gather_rows_kernel[(programs,)](
        source=source.view(torch.uint8) if quantized else source,
        indices=indices,
        target=out,
        hot=hot if use_hot else out,
        hot_slots=hot_slots.contiguous() if use_hot else indices,
        rows_total=batch * k,
        k=k,
        source_batch_stride=source.stride(0),
        source_row_stride=source.stride(1),
        target_batch_stride=out.stride(0),
        target_row_stride=out.stride(1),
        hot_batch_stride=hot.stride(0) if use_hot else 0,
        hot_row_stride=hot.stride(1) if use_hot else 0,
        ROWS=rows,
        HOT=use_hot,
        QUANTIZED=quantized,
        num_warps=QUANTIZED_GATHER_WARPS if quantized else 4,
        **tiles,
        **_scale_arguments(scales),
    )
    return out


@triton.jit
def _copy_row_kernel(
    source,  # [batch, slots, row_elems] rows contiguous
    source_index,  # int64 [batch] (or [1]: stride 0), device
    target,  # [batch, tokens, row_elems] rows contiguous, host (pinned) or device (QUANTIZED: uint8)
    scales,  # QUANTIZED: [batch, tokens, groups] float32, rows contiguous
    target_index,  # int64 [batch] (or [1]: stride 0), device
    index_stride,  # 1 for per-row indices, 0 for one index shared by every row
    row_elems,
    groups,  # QUANTIZED: groups (heads) of dim values per row, one scale each
    dim,
    source_batch_stride,
    source_row_stride,
    target_batch_stride,
    target_row_stride,
    scales_batch_stride,
    scales_row_stride,
    BLOCK: tl.constexpr,  # values per program (plain)
    GROUPS: tl.constexpr,  # heads per program (QUANTIZED)
    DIM: tl.constexpr,  # dim padded to a power of two (QUANTIZED)
    QUANTIZED: tl.constexpr,  # quantize into FP8 codes and scales
):
    b = tl.program_id(0).to(tl.int64)
    if QUANTIZED:
        group = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
        column = tl.arange(0, DIM)
        inside = (group < groups)[:, None] & (column < dim)[None, :]
        offsets = group[:, None] * dim + column[None, :]
    else:
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < row_elems
    src = source + b * source_batch_stride + tl.load(source_index + b * index_stride) * source_row_stride
    if QUANTIZED:
        x = tl.load(src + offsets, mask=inside, other=0.0).to(tl.float32)  # zeros: a head's maximum is its own
        codes, scale = quantize_groups(x, 1)
        token = tl.load(target_index + b * index_stride)
        tl.store(target + b * target_batch_stride + token * target_row_stride + offsets, codes, mask=inside)
        tl.store(scales + b * scales_batch_stride + token * scales_row_stride + group, scale, mask=group < groups)
    else:
        dst = target + b * target_batch_stride + tl.load(target_index + b * index_stride) * target_row_stride
        tl.store(dst + offsets, tl.load(src + offsets, mask=inside), mask=inside)


def copy_row(
    target: torch.Tensor,
    target_index: torch.Tensor,
    source: torch.Tensor,
    source_index: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> None:
    """``target[b, target_index[b]] = source[b, source_index[b]]`` for every batch row, with both
    indices int64 ``[batch]`` tensors on the GPU (a decode step's write-back: no host value, so a
    CUDA graph replays it at each step's position; ``[1]`` indices serve every row). ``target`` may
    be pinned host memory. With ``scales`` the target is an FP8 tier: ``source`` ``[batch, slots, *row,
    head_dim]`` (the tail ring, model dtype) is quantized into the float8 (or uint8) codes ``target``
    ``[batch, tokens, *row, head_dim]`` and the float32 ``scales`` ``[batch, tokens, *row]``."""
    quantized = scales is not None
    if target.shape[0] != source.shape[0] or target.shape[2:] != source.shape[2:]:
        raise ValueError(f"rows of {tuple(source.shape)} do not fit {tuple(target.shape)}")
    if quantized and (scales.shape != target.shape[:-1] or scales.dtype != torch.float32):
        raise ValueError(f"scales {tuple(scales.shape)} {scales.dtype} do not fit codes {tuple(target.shape)}")
    if not (_rows_contiguous(target) and _rows_contiguous(source) and (not quantized or _rows_contiguous(scales))):
        raise ValueError("copy_row needs contiguous rows")
    row_elems = source[0, 0].numel()
    if quantized:
        tiles = _head_tiles(row_elems, source.shape[-1])
        grid = (source.shape[0], triton.cdiv(tiles["groups"], tiles["GROUPS"]))
    else:
        tiles = _flat_tiles(row_elems, min(MAX_BLOCK, triton.next_power_of_2(row_elems)))
        grid = (source.shape[0], triton.cdiv(row_elems, tiles["BLOCK"]))
    _copy_row_kernel[grid](
        source=source,
        source_index=source_index,
        target=target.view(torch.uint8) if quantized else target,
        target_index=target_index,
        index_stride=index_stride(source_index, target_index, source.shape[0]),
        source_batch_stride=source.stride(0),
        source_row_stride=source.stride(1),
        target_batch_stride=target.stride(0),
        target_row_stride=target.stride(1),
        QUANTIZED=quantized,
        **tiles,
        **_scale_arguments(scales),
    )


@triton.jit
def _scatter_rows_kernel(
    keys,  # [batch, heads, n, dim], any strides but unit head_dim stride, device
    values,  # same shape, any strides, device
    arena,  # [batch, capacity, layers, 2, heads, dim], contiguous, host (pinned) or device (QUANTIZED: uint8)
    scales,  # QUANTIZED: [batch, capacity, layers, 2, heads] float32, contiguous
    n,
    heads,
    dim,
    start,
    slot,
    key_strides_b,
    key_strides_h,
    key_strides_t,
    value_strides_b,
    value_strides_h,
    value_strides_t,
    arena_batch_stride,
    arena_row_stride,
    scales_batch_stride,
    scales_row_stride,
    BLOCK: tl.constexpr,  # >= heads * dim (plain)
    HEADS: tl.constexpr,  # heads padded to a power of two (QUANTIZED)
    DIM: tl.constexpr,  # dim padded to a power of two (QUANTIZED)
    QUANTIZED: tl.constexpr,  # quantize into FP8 codes and a scale per head
):
    job = tl.program_id(0)  # one token of one batch row
    b = job // n
    t = job % n
    if QUANTIZED:  # a head per tile row
        head = tl.arange(0, HEADS)
        h = head[:, None]
        d = tl.arange(0, DIM)[None, :]
        inside = (h < heads) & (d < dim)
        offsets = h * dim + d
    else:
        offsets = tl.arange(0, BLOCK)
        inside = offsets < heads * dim
        h = offsets // dim
        d = offsets % dim
    masked = 0.0 if QUANTIZED else None  # zeros in masked lanes: a head's maximum is over its values
    key_row = tl.load(keys + b * key_strides_b + t * key_strides_t + h * key_strides_h + d, mask=inside, other=masked)
    value_row = tl.load(
        values + b * value_strides_b + t * value_strides_t + h * value_strides_h + d, mask=inside, other=masked
    )
    target = arena + b.to(tl.int64) * arena_batch_stride + (start + t).to(tl.int64) * arena_row_stride
    target += slot * 2 * heads * dim
    if QUANTIZED:
        scale_at = scales + b.to(tl.int64) * scales_batch_stride + (start + t).to(tl.int64) * scales_row_stride
        scale_at += slot * 2 * heads
        store_quantized(key_row, target + offsets, scale_at + head, inside, head < heads)
        store_quantized(value_row, target + heads * dim + offsets, scale_at + heads + head, inside, head < heads)
    else:
        tl.store(target + offsets, key_row, mask=inside)
        tl.store(target + heads * dim + offsets, value_row, mask=inside)


def scatter_rows(
    arena: torch.Tensor,
    slot: int,
    start: int,
    keys: torch.Tensor,
    values: torch.Tensor,
    scales: torch.Tensor | None = None,
) -> None:
    """``arena[b, start + t, slot] = (keys[b, :, t], values[b, :, t])``, written by the GPU (UVA stores
    into pinned host memory), one program per token; keys and values ``[batch, kv_heads, n, head_dim]``
    may have any strides but a unit head_dim stride. With ``scales`` the arena is an FP8 tier, quantized
    on the way: float8 (or uint8) codes ``[batch, capacity, layers, 2, kv_heads, head_dim]`` and float32
    ``scales`` ``[batch, capacity, layers, 2, kv_heads]``, both contiguous."""
    batch, heads, n, dim = keys.shape
    quantized = scales is not None
    if arena.shape[0] != batch or arena.shape[-2:] != (heads, dim) or not arena.is_contiguous():
        raise ValueError(f"rows of {tuple(keys.shape)} do not fit the arena {tuple(arena.shape)}")
    if quantized and (scales.shape != arena.shape[:-1] or not scales.is_contiguous() or scales.dtype != torch.float32):
        raise ValueError(f"scales {tuple(scales.shape)} {scales.dtype} do not fit the arena {tuple(arena.shape)}")
    if start + n > arena.shape[1] or values.shape != keys.shape or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("scatter_rows needs matching key/value shapes, unit-stride head_dim and room in the arena")
    if batch * n == 0:
        return
    if quantized:
        tiles = {"BLOCK": None, "HEADS": triton.next_power_of_2(heads), "DIM": triton.next_power_of_2(dim)}
    else:
        tiles = {"BLOCK": triton.next_power_of_2(heads * dim), "HEADS": None, "DIM": None}
    _scatter_rows_kernel[(batch * n,)](
        keys=keys,
        values=values,
        arena=arena.view(torch.uint8) if quantized else arena,
        n=n,
        heads=heads,
        dim=dim,
        start=start,
        slot=slot,
        key_strides_b=keys.stride(0),
        key_strides_h=keys.stride(1),
        key_strides_t=keys.stride(2),
        value_strides_b=values.stride(0),
        value_strides_h=values.stride(1),
        value_strides_t=values.stride(2),
        arena_batch_stride=arena.stride(0),
        arena_row_stride=arena.stride(1),
        QUANTIZED=quantized,
        **tiles,
        **_scale_arguments(scales),
    )

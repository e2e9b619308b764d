"""Gather of selected token rows straight from pinned host memory, on the GPU, with Triton.

The host tier is token-major (``[batch, tokens, row]``, one row = every sparse layer of a segment,
keys and values), so a selected token is one contiguous read; one layer's slice of a row is too.
This kernel runs on the GPU, reads those rows through unified virtual addressing (pinned host
memory is addressable from the GPU) at indices that stay on the GPU, and writes them densely into
a GPU buffer ``[batch, k, row]``.

It is persistent and narrow: ``num_programs`` CTAs (about 32) loop over the rows. Measured on an
H100 (a 201 MB gather next to two 8192-cubed matmuls), 32 CTAs reach the PCIe link's bandwidth and
leave the rest of the GPU to compute on another stream, where one CTA per row serialises with it.
Under ``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors (how CI tests it).

An FP8 host tier (:mod:`omnikv_runtime.transfer.fp8`) is read by its sibling kernel in
:mod:`omnikv_runtime.transfer.triton_fp8` (same persistent loop, ``gather_rows(..., scales=...)``):
it loads the one-byte codes and each head's scale and writes values of the output's dtype, so PCIe
carries the FP8 bytes and the GPU's buffers stay in the model's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omnikv_runtime.kernels.triton_support import index_stride
from omnikv_runtime.transfer.triton_fp8 import copy_row_fp8, gather_rows_fp8, scatter_rows_fp8

DEFAULT_PROGRAMS = 32
MAX_BLOCK = 4096  # elements of one row per inner step
TILE_ELEMENTS = 8192  # elements in flight per CTA per step (rows x block)


@triton.jit
def _gather_rows_kernel(
    source,  # [batch, tokens, row], host (pinned) or device; rows contiguous, other strides free
    indices,  # [batch, k] int64, device: token to read from source (-1: read the hot slot instead)
    target,  # [batch, k, row], device; rows contiguous
    hot,  # [batch, slots + 1, row], device (HOT only)
    hot_slots,  # [batch, k] int64, device (HOT only): slot a hit reads or a miss fills
    rows_total,  # batch * k
    k,
    row_elems,
    source_batch_stride,
    source_row_stride,
    target_batch_stride,
    target_row_stride,
    hot_batch_stride,
    hot_row_stride,
    ROWS: tl.constexpr,  # rows in flight per iteration: small rows need several to fill the link
    BLOCK: tl.constexpr,  # elements per row per inner step
    HOT: tl.constexpr,  # delta fetch through a hot cache
):
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    row_offsets = tl.arange(0, ROWS)
    columns = tl.arange(0, BLOCK)
    for first in range(program * ROWS, rows_total, programs * ROWS):
        jobs = tl.cast(first, tl.int64) + row_offsets  # int64: host arenas pass 2**31 elements
        live = jobs < rows_total
        batch_row = jobs // k
        tokens = tl.load(indices + jobs, mask=live, other=0).to(tl.int64)
        from_source = live & (tokens >= 0)
        source_rows = source + batch_row * source_batch_stride + tl.maximum(tokens, 0) * source_row_stride
        target_rows = target + batch_row * target_batch_stride + (jobs % k) * target_row_stride
        if HOT:
            slots = tl.load(hot_slots + jobs, mask=live, other=0).to(tl.int64)
            hot_rows = hot + batch_row * hot_batch_stride + slots * hot_row_stride
            from_hot = live & (tokens < 0)
        for start in range(0, row_elems, BLOCK):
            offsets = start + columns
            inside = (offsets < row_elems)[None, :]
            values = tl.load(source_rows[:, None] + offsets[None, :], mask=from_source[:, None] & inside)
            if HOT:
                cached = tl.load(hot_rows[:, None] + offsets[None, :], mask=from_hot[:, None] & inside)
                values = tl.where(from_hot[:, None], cached, values)
                # a miss lands in its slot too (uncached misses and hits write nowhere useful: the scratch row)
                tl.store(hot_rows[:, None] + offsets[None, :], values, mask=from_source[:, None] & inside)
            tl.store(target_rows[:, None] + offsets[None, :], values, mask=live[:, None] & inside)


def _rows_contiguous(tensor: torch.Tensor) -> bool:
    """True when each ``tensor[b, t]`` row is one contiguous run of elements."""
    if tensor.numel() == 0 or tensor.dim() < 3:
        return True
    return tensor[0, 0].is_contiguous()


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
        indices: ``[batch, k]`` integer token indices (on the GPU; never copied to the host).
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
    dtype_ok = out.dtype == source.dtype if scales is None else out.dtype.is_floating_point
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
    scaled = scales is not None
    if scaled and (scales.shape != source.shape[:-1] or scales.dtype != torch.float32 or not _rows_contiguous(scales)):
        raise ValueError(f"scales {tuple(scales.shape)} {scales.dtype} do not fit codes {tuple(source.shape)}")
    row_elems = source[0, 0].numel() if source.shape[0] and source.shape[1] else 0
    if batch * k == 0 or row_elems == 0:
        return out
    block = min(MAX_BLOCK, triton.next_power_of_2(row_elems))
    rows = max(1, min(64, tile_elements // block))  # about 8K elements (16 KB of bf16) in flight per CTA
    programs = max(1, min(num_programs, triton.cdiv(batch * k, rows)))
    indices = indices.contiguous()
    if scaled:
        hot_slots = hot_slots.contiguous() if use_hot else None
        return gather_rows_fp8(source, scales, indices, out, programs, hot, hot_slots, tile_elements)
    _gather_rows_kernel[(programs,)](
        source,
        indices,
        out,
        hot if use_hot else out,
        hot_slots.contiguous() if use_hot else indices,
        batch * k,
        k,
        row_elems,
        source.stride(0),
        source.stride(1),
        out.stride(0),
        out.stride(1),
        hot.stride(0) if use_hot else 0,
        hot.stride(1) if use_hot else 0,
        ROWS=rows,
        BLOCK=block,
        HOT=use_hot,
    )
    return out


@triton.jit
def _copy_row_kernel(
    source,  # [batch, slots, row_elems] rows contiguous
    source_index,  # int64 [batch] (or [1]: stride 0), device
    target,  # [batch, tokens, row_elems] rows contiguous, host (pinned) or device
    target_index,  # int64 [batch] (or [1]: stride 0), device
    index_stride,  # 1 for per-row indices, 0 for one index shared by every row
    row_elems,
    source_batch_stride,
    source_row_stride,
    target_batch_stride,
    target_row_stride,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < row_elems
    src = source + b * source_batch_stride + tl.load(source_index + b * index_stride) * source_row_stride
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
    be pinned host memory. With ``scales`` the target is an FP8 tier: the row is quantized into it
    (see :func:`copy_row_fp8`)."""
    if scales is not None:
        copy_row_fp8(target, scales, target_index, source, source_index)
        return
    if target.shape[0] != source.shape[0] or target.shape[2:] != source.shape[2:]:
        raise ValueError(f"rows of {tuple(source.shape)} do not fit {tuple(target.shape)}")
    if not (_rows_contiguous(target) and _rows_contiguous(source)):
        raise ValueError("copy_row needs contiguous rows")
    row_elems = source[0, 0].numel()
    block = min(MAX_BLOCK, triton.next_power_of_2(row_elems))
    _copy_row_kernel[(source.shape[0], triton.cdiv(row_elems, block))](
        source,
        source_index,
        target,
        target_index,
        index_stride(source_index, target_index, source.shape[0]),
        row_elems,
        source.stride(0),
        source.stride(1),
        target.stride(0),
        target.stride(1),
        BLOCK=block,
    )


@triton.jit
def _scatter_rows_kernel(
    keys,  # [batch, heads, n, dim], any strides, device
    values,  # same shape, any strides, device
    arena,  # [batch, capacity, layers, 2, heads, dim], contiguous, host (pinned) or device
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
    arena_token_stride,
    BLOCK: tl.constexpr,  # >= heads * dim
):
    job = tl.program_id(0)  # one token of one batch row
    b = job // n
    t = job % n
    offsets = tl.arange(0, BLOCK)
    inside = offsets < heads * dim
    h = offsets // dim
    d = offsets % dim
    key_row = tl.load(keys + b * key_strides_b + t * key_strides_t + h * key_strides_h + d, mask=inside)
    value_row = tl.load(values + b * value_strides_b + t * value_strides_t + h * value_strides_h + d, mask=inside)
    target = arena + b.to(tl.int64) * arena_batch_stride + (start + t).to(tl.int64) * arena_token_stride
    target += slot * 2 * heads * dim
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
    into pinned host memory), one program per token; keys and values may have any strides. With
    ``scales`` the arena is an FP8 tier: quantized on the way (see :func:`scatter_rows_fp8`)."""
    if scales is not None:
        scatter_rows_fp8(arena, scales, slot, start, keys, values)
        return
    batch, heads, n, dim = keys.shape
    if arena.shape[0] != batch or arena.shape[-2:] != (heads, dim) or not arena.is_contiguous():
        raise ValueError(f"rows of {tuple(keys.shape)} do not fit the arena {tuple(arena.shape)}")
    if start + n > arena.shape[1] or values.shape != keys.shape or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("scatter_rows needs matching key/value shapes, unit-stride head_dim and room in the arena")
    if batch * n == 0:
        return
    _scatter_rows_kernel[(batch * n,)](
        keys,
        values,
        arena,
        n,
        heads,
        dim,
        start,
        slot,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        arena.stride(0),
        arena.stride(1),
        BLOCK=triton.next_power_of_2(heads * dim),
    )

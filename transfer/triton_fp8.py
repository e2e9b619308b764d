"""Triton kernels of the FP8 host tier: quantizing writes into it, dequantizing reads out of it.

The format is :mod:`omnikv_runtime.transfer.fp8`'s (float8 e4m3 codes, a power-of-two float32
scale per group of ``head_dim`` values). The conversions (:func:`fp8_encode`, :func:`fp8_decode`)
are integer arithmetic on the bits, not casts, so that they round to nearest even the same way on
every GPU and under ``TRITON_INTERPRET=1`` (whose float8 casts truncate); a dequantized value then
converts to the model's dtype exactly. :mod:`omnikv_runtime.transfer.triton_gather`'s entry points
(``gather_rows``, ``copy_row``, ``scatter_rows``) call these when given ``scales``.

- :func:`scatter_rows_fp8`: a prefill chunk's keys and values ``[batch, kv_heads, n, head_dim]``
  into one layer slot of the arena, one program per token.
- :func:`copy_row_fp8`: a decode step's packed row from the GPU tail ring into the arena at a
  device-side position (no host value: a CUDA graph replays it).
- :func:`gather_rows_fp8`: selected rows (or one layer's slice of them) out of the arena into a
  buffer of the model's dtype, dequantized on the way; the persistent loop of
  :func:`~omnikv_runtime.transfer.triton_gather.gather_rows`, with tiles of whole heads so that each
  row's scales are one short contiguous read, not one per value.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from omnikv_runtime.kernels.triton_support import index_stride

MAX_TILE = 4096  # values per program and step of the write-back


@triton.jit
def fp8_decode(codes):
    """uint8 e4m3fn codes -> float32 values (exact): the code's bits placed in a float16, times 2**8."""
    bits = codes.to(tl.int32)
    half = ((bits & 0x80) << 8) | ((bits & 0x7F) << 7)
    return half.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32) * 256.0


@triton.jit
def fp8_encode(y):
    """float32 values with ``|y| <= 448`` -> uint8 e4m3fn codes, rounded to nearest even."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    magnitude = bits & 0x7FFFFFFF
    exponent = magnitude >> 23
    mantissa = (magnitude & 0x7FFFFF) | 0x800000
    normal = exponent >= 121  # |y| >= 2**-6, e4m3's smallest normal
    shift = tl.where(normal, 20, tl.minimum(141 - exponent, 25))
    rounded = (mantissa + (1 << (shift - 1)) - 1 + ((mantissa >> shift) & 1)) >> shift
    code = tl.where(normal, (exponent - 121) << 3, 0) + rounded  # a carry moves into the exponent field
    return (code | sign).to(tl.uint8)


@triton.jit
def quantize_groups(x, group_axis: tl.constexpr):
    """float32 ``x`` -> (uint8 codes, float32 scales): one power-of-two scale per group along ``group_axis``."""
    amax = tl.max(tl.abs(x), axis=group_axis)
    bits = amax.to(tl.int32, bitcast=True)
    k = (bits >> 23) - 135 + ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)  # 448 = 1.75 * 2**8
    k = tl.minimum(tl.maximum(k, -126), 126)
    scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
    inverse = ((127 - k) << 23).to(tl.float32, bitcast=True)
    y = x * tl.expand_dims(inverse, group_axis)
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    return fp8_encode(y), scale


@triton.jit
def _copy_row_fp8_kernel(
    source,  # [batch, slots, groups * dim] model dtype, rows contiguous
    source_index,  # int64 [batch] (or [1]: stride 0), device
    codes,  # [batch, tokens, groups * dim] uint8, rows contiguous, host (pinned) or device
    scales,  # [batch, tokens, groups] float32, rows contiguous
    target_index,  # int64 [batch] (or [1]: stride 0), device
    index_stride,  # 1 for per-row indices, 0 for one index shared by every row
    groups,
    dim,
    source_batch_stride,
    source_row_stride,
    codes_batch_stride,
    codes_row_stride,
    scales_batch_stride,
    scales_row_stride,
    GROUPS: tl.constexpr,
    DIM: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS)
    column = tl.arange(0, DIM)
    inside = (group < groups)[:, None] & (column < dim)[None, :]
    offsets = group[:, None] * dim + column[None, :]
    src = source + b * source_batch_stride + tl.load(source_index + b * index_stride) * source_row_stride
    x = tl.load(src + offsets, mask=inside, other=0.0).to(tl.float32)
    quantized, scale = quantize_groups(x, 1)
    token = tl.load(target_index + b * index_stride)
    tl.store(codes + b * codes_batch_stride + token * codes_row_stride + offsets, quantized, mask=inside)
    tl.store(scales + b * scales_batch_stride + token * scales_row_stride + group, scale, mask=group < groups)


def copy_row_fp8(
    codes: torch.Tensor,
    scales: torch.Tensor,
    target_index: torch.Tensor,
    source: torch.Tensor,
    source_index: torch.Tensor,
) -> None:
    """Quantize ``source[b, source_index]`` into ``codes[b, target_index]`` / ``scales[b, target_index]``.

    ``source`` ``[batch, slots, *row, head_dim]`` (the tail ring, model dtype); ``codes`` float8 (or
    uint8) ``[batch, tokens, *row, head_dim]``; ``scales`` float32 ``[batch, tokens, *row]``; each
    token's row contiguous in all three; both indices int64 ``[batch]`` (or ``[1]``, shared) on the device.
    """
    if codes.shape[0] != source.shape[0] or codes.shape[2:] != source.shape[2:]:
        raise ValueError(f"rows of {tuple(source.shape)} do not fit {tuple(codes.shape)}")
    if scales.shape != codes.shape[:-1] or scales.dtype != torch.float32:
        raise ValueError(f"scales {tuple(scales.shape)} {scales.dtype} do not fit codes {tuple(codes.shape)}")
    if not all(t[0, 0].is_contiguous() for t in (codes, scales, source) if t.shape[1]):
        raise ValueError("copy_row_fp8 needs contiguous rows")
    dim = source.shape[-1]
    groups = source[0, 0].numel() // dim
    block = triton.next_power_of_2(dim)
    per_program = max(1, min(triton.next_power_of_2(groups), MAX_TILE // block))
    _copy_row_fp8_kernel[(source.shape[0], triton.cdiv(groups, per_program))](
        source,
        source_index,
        codes.view(torch.uint8),
        scales,
        target_index,
        index_stride(source_index, target_index, source.shape[0]),
        groups,
        dim,
        source.stride(0),
        source.stride(1),
        codes.stride(0),
        codes.stride(1),
        scales.stride(0),
        scales.stride(1),
        GROUPS=per_program,
        DIM=block,
    )


@triton.jit
def _scatter_rows_fp8_kernel(
    keys,  # [batch, heads, n, dim], any strides but unit head_dim stride, device
    values,  # same shape
    codes,  # [batch, capacity, layers, 2, heads, dim] uint8, contiguous
    scales,  # [batch, capacity, layers, 2, heads] float32, contiguous
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
    codes_batch_stride,
    codes_token_stride,
    scales_batch_stride,
    scales_token_stride,
    HEADS: tl.constexpr,
    DIM: tl.constexpr,
):
    job = tl.program_id(0)  # one token of one batch row
    b = (job // n).to(tl.int64)
    t = job % n
    h = tl.arange(0, HEADS)
    d = tl.arange(0, DIM)
    inside = (h < heads)[:, None] & (d < dim)[None, :]
    token = (start + t).to(tl.int64)
    code_row = codes + b * codes_batch_stride + token * codes_token_stride + slot * 2 * heads * dim
    scale_row = scales + b * scales_batch_stride + token * scales_token_stride + slot * 2 * heads
    key_at = keys + b * key_strides_b + t * key_strides_t + h[:, None] * key_strides_h + d[None, :]
    value_at = values + b * value_strides_b + t * value_strides_t + h[:, None] * value_strides_h + d[None, :]
    offsets = h[:, None] * dim + d[None, :]
    _store_heads(key_at, code_row + offsets, scale_row + h, inside, h < heads)
    _store_heads(value_at, code_row + heads * dim + offsets, scale_row + heads + h, inside, h < heads)


@triton.jit
def _store_heads(source, code_at, scale_at, inside, live_heads):
    """Quantize one token's ``[heads, dim]`` tile (a head per row) and store codes and scales."""
    x = tl.load(source, mask=inside, other=0.0).to(tl.float32)
    quantized, scale = quantize_groups(x, 1)
    tl.store(code_at, quantized, mask=inside)
    tl.store(scale_at, scale, mask=live_heads)


def scatter_rows_fp8(
    codes: torch.Tensor, scales: torch.Tensor, slot: int, start: int, keys: torch.Tensor, values: torch.Tensor
) -> None:
    """Quantize ``keys``/``values`` ``[batch, kv_heads, n, head_dim]`` into tokens ``start..start+n`` of
    layer ``slot`` of the arena ``codes`` ``[batch, capacity, layers, 2, kv_heads, head_dim]`` (float8 or
    uint8, contiguous) and ``scales`` ``[batch, capacity, layers, 2, kv_heads]`` (float32, contiguous)."""
    batch, heads, n, dim = keys.shape
    if codes.shape[0] != batch or codes.shape[-2:] != (heads, dim) or not codes.is_contiguous():
        raise ValueError(f"rows of {tuple(keys.shape)} do not fit the arena {tuple(codes.shape)}")
    if scales.shape != codes.shape[:-1] or not scales.is_contiguous() or scales.dtype != torch.float32:
        raise ValueError(f"scales {tuple(scales.shape)} {scales.dtype} do not fit the arena {tuple(codes.shape)}")
    if start + n > codes.shape[1] or values.shape != keys.shape or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("scatter_rows needs matching key/value shapes, unit-stride head_dim and room in the arena")
    if batch * n == 0:
        return
    _scatter_rows_fp8_kernel[(batch * n,)](
        keys,
        values,
        codes.view(torch.uint8),
        scales,
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
        codes.stride(0),
        codes.stride(1),
        scales.stride(0),
        scales.stride(1),
        HEADS=triton.next_power_of_2(heads),
        DIM=triton.next_power_of_2(dim),
    )


@triton.jit
def _gather_rows_kernel_fp8(
    codes,  # [batch, tokens, groups * dim] uint8 e4m3 codes, host (pinned) or device; rows contiguous
    scales,  # [batch, tokens, groups] float32; rows contiguous
    indices,  # [batch, k] int64, device: token to read (-1: read the hot slot instead)
    target,  # [batch, k, groups * dim] model dtype, device; rows contiguous
    hot,  # [batch, slots + 1, groups * dim] model dtype, device (HOT only)
    hot_slots,  # [batch, k] int64, device (HOT only)
    rows_total,
    k,
    groups,
    dim,
    codes_batch_stride,
    codes_row_stride,
    scales_batch_stride,
    scales_row_stride,
    target_batch_stride,
    target_row_stride,
    hot_batch_stride,
    hot_row_stride,
    ROWS: tl.constexpr,
    GROUPS: tl.constexpr,  # heads (groups of dim values) per inner step
    DIM: tl.constexpr,
    HOT: tl.constexpr,
):
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    row_offsets = tl.arange(0, ROWS)
    group_offsets = tl.arange(0, GROUPS)
    columns = tl.arange(0, DIM)
    for first in range(program * ROWS, rows_total, programs * ROWS):
        jobs = tl.cast(first, tl.int64) + row_offsets  # int64: host arenas pass 2**31 elements
        live = jobs < rows_total
        batch_row = jobs // k
        tokens = tl.load(indices + jobs, mask=live, other=0).to(tl.int64)
        from_source = live & (tokens >= 0)
        token = tl.maximum(tokens, 0)
        code_rows = codes + batch_row * codes_batch_stride + token * codes_row_stride
        scale_rows = scales + batch_row * scales_batch_stride + token * scales_row_stride
        target_rows = target + batch_row * target_batch_stride + (jobs % k) * target_row_stride
        if HOT:
            slots = tl.load(hot_slots + jobs, mask=live, other=0).to(tl.int64)
            hot_rows = hot + batch_row * hot_batch_stride + slots * hot_row_stride
            from_hot = live & (tokens < 0)
        for start in range(0, groups, GROUPS):
            group = start + group_offsets
            cells = (group[:, None] * dim + columns[None, :])[None, :, :]  # [1, GROUPS, DIM]
            inside = ((group < groups)[:, None] & (columns < dim)[None, :])[None, :, :]
            read = from_source[:, None, None] & inside
            quantized = tl.load(code_rows[:, None, None] + cells, mask=read, other=0)
            scale_mask = from_source[:, None] & (group < groups)[None, :]
            scale = tl.load(scale_rows[:, None] + group[None, :], mask=scale_mask, other=0.0)
            values = (fp8_decode(quantized) * scale[:, :, None]).to(target.dtype.element_ty)
            if HOT:
                cached = tl.load(hot_rows[:, None, None] + cells, mask=from_hot[:, None, None] & inside)
                values = tl.where(from_hot[:, None, None], cached, values)
                # a miss lands in its slot too (uncached misses write the scratch row)
                tl.store(hot_rows[:, None, None] + cells, values, mask=read)
            tl.store(target_rows[:, None, None] + cells, values, mask=live[:, None, None] & inside)


def gather_rows_fp8(
    codes: torch.Tensor,
    scales: torch.Tensor,
    indices: torch.Tensor,
    out: torch.Tensor,
    num_programs: int,
    hot: torch.Tensor | None,
    hot_slots: torch.Tensor | None,
    tile_elements: int,
) -> torch.Tensor:
    """``out[b, j] = dequantize(codes[b, indices[b, j]], scales[b, indices[b, j]])`` (and the hot-cache
    delta fetch), for arguments already checked by ``gather_rows``: ``codes`` ``[batch, tokens, *row,
    head_dim]``, ``scales`` ``[batch, tokens, *row]``, each row contiguous; ``indices`` contiguous."""
    batch, k = indices.shape
    dim = codes.shape[-1]
    groups = codes[0, 0].numel() // dim
    block = triton.next_power_of_2(dim)
    per_step = max(1, min(triton.next_power_of_2(groups), MAX_TILE // block))
    rows = max(1, min(64, tile_elements // (per_step * block)))
    programs = max(1, min(num_programs, triton.cdiv(batch * k, rows)))
    use_hot = hot is not None
    _gather_rows_kernel_fp8[(programs,)](
        codes.view(torch.uint8),
        scales,
        indices,
        out,
        hot if use_hot else out,
        hot_slots if use_hot else indices,
        batch * k,
        k,
        groups,
        dim,
        codes.stride(0),
        codes.stride(1),
        scales.stride(0),
        scales.stride(1),
        out.stride(0),
        out.stride(1),
        hot.stride(0) if use_hot else 0,
        hot.stride(1) if use_hot else 0,
        ROWS=rows,
        GROUPS=per_step,
        DIM=block,
        HOT=use_hot,
        num_warps=8,  # 8K values per step: with 4 warps the decoding spills registers (ptxas, sm_90)
    )
    return out

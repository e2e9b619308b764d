"""A decode step's cache write: each batch row's new key and value into its own column, in one launch.

A decode step stores one token a row in every layer: the dense layers at the row's position of their key and
value buffers, the sparse layers at the row's slot of their tail ring. The column differs per row and lives on
the device (a recorded step has no host value for it), so torch writes it with ``scatter_``: one launch for the
keys and one for the values, each a single block that spends about 3.5 µs on an H100 computing 64-bit offsets
for 1,024 elements (64 launches, 0.22 ms of a 32-layer Llama-3-8B step). Here one Triton launch writes both, a
program per row and tensor; elsewhere (CPU, no Triton) the same two ``scatter_`` calls run.
"""

from __future__ import annotations

import torch

from omnikv_runtime.kernels.triton_support import INTERPRETED, TRITON_AVAILABLE, index_stride

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _write_pair_member(
        row,
        column,
        capacity,
        buffer_ptr,
        values_ptr,
        b_row,
        b_column,
        b_outer,
        b_inner,
        v_row,
        v_outer,
        v_inner,
        outer,
        inner,
        OUTER: tl.constexpr,
        INNER: tl.constexpr,
    ):
        o = tl.arange(0, OUTER)[:, None].to(tl.int64)
        i = tl.arange(0, INNER)[None, :].to(tl.int64)
        outer_written = tl.where((column >= 0) & (column < capacity), outer, 0)  # a column outside: none
        inside = (o < outer_written) & (i < inner)
        token = tl.load(values_ptr + row * v_row + o * v_outer + i * v_inner, mask=inside)
        tl.store(buffer_ptr + row * b_row + column * b_column + o * b_outer + i * b_inner, token, mask=inside)

    @triton.jit
    def _write_columns_kernel(
        columns_ptr, column_step, capacity, outer, inner,
        buffer0, values0, b_row0, b_column0, b_outer0, b_inner0, v_row0, v_outer0, v_inner0,
        buffer1, values1, b_row1, b_column1, b_outer1, b_inner1, v_row1, v_outer1, v_inner1,
        OUTER: tl.constexpr, INNER: tl.constexpr,
    ):  # fmt: skip
        row, which = tl.program_id(0).to(tl.int64), tl.program_id(1)
        column = tl.load(columns_ptr + row * column_step)
        if which == 0:
            _write_pair_member(
                row, column, capacity, buffer0, values0, b_row0, b_column0, b_outer0, b_inner0, v_row0, v_outer0,
                v_inner0, outer, inner, OUTER, INNER,
            )  # fmt: skip
        else:
            _write_pair_member(
                row, column, capacity, buffer1, values1, b_row1, b_column1, b_outer1, b_inner1, v_row1, v_outer1,
                v_inner1, outer, inner, OUTER, INNER,
            )  # fmt: skip


def _scatter(buffer: torch.Tensor, dim: int, columns: torch.Tensor, values: torch.Tensor) -> None:
    shape = [1] * values.dim()
    shape[0] = columns.numel()
    buffer.scatter_(dim, columns.view(shape).expand_as(values), values)


def _fits_the_kernel(dim: int, columns: torch.Tensor, pairs: tuple[tuple[torch.Tensor, torch.Tensor], ...]) -> bool:
    buffer, values = pairs[0]
    if not TRITON_AVAILABLE or not (buffer.is_cuda or INTERPRETED) or not 1 <= len(pairs) <= 2 or dim not in (1, 2, 3):
        return False
    if columns.dtype != torch.int64 or columns.device != buffer.device or columns.numel() not in (1, values.shape[0]):
        return False
    slice_shape = [size for d, size in enumerate(values.shape) if d not in (0, dim)]
    for other_buffer, other_values in pairs:
        if other_buffer.dim() != 4 or other_values.dim() != 4 or other_values.shape[dim] != 1:
            return False
        if other_values.shape != values.shape or other_buffer.dtype != other_values.dtype:
            return False
        if other_buffer.device != buffer.device or other_values.device != buffer.device:
            return False
        buffer_shape = [size for d, size in enumerate(other_buffer.shape) if d not in (0, dim)]
        if buffer_shape != slice_shape or other_buffer.shape[0] != values.shape[0]:
            return False
    return buffer.shape[dim] == pairs[-1][0].shape[dim]


def _strides(tensor: torch.Tensor, dim: int) -> list[int]:
    """Row, column, outer and inner strides: the column dimension ``dim`` first, then the other two in order."""
    rest = [tensor.stride(d) for d in range(1, 4) if d != dim]
    return [tensor.stride(0), tensor.stride(dim), *rest]


def write_columns(dim: int, columns: torch.Tensor, *pairs: tuple[torch.Tensor, torch.Tensor]) -> None:
    """For each ``(buffer, values)`` pair, ``buffer[b, ..., columns[b], ...] = values[b, ...]`` along ``dim``.

    ``values`` has size 1 along ``dim``; ``columns`` is int64 ``[batch]`` (or one entry for every row) on the
    buffers' device: no host value is read, so a recorded step can replay it. On CUDA one launch writes the
    pairs (one or two four-dimensional buffers of one shape, e.g. a layer's keys and values; a column outside
    the buffer writes nothing); elsewhere, and for other shapes, each pair is one ``scatter_``.
    """
    if not pairs:
        return
    if not _fits_the_kernel(dim, columns, pairs):
        for buffer, values in pairs:
            _scatter(buffer, dim, columns, values)
        return
    buffer, values = pairs[0]
    batch = values.shape[0]
    if batch == 0:
        return
    outer, inner = (size for d, size in enumerate(values.shape) if d not in (0, dim))
    arguments = []
    for pair_buffer, pair_values in (pairs[0], pairs[-1]):  # one pair: its program 1 is never launched
        row, column, outer_stride, inner_stride = _strides(pair_buffer, dim)
        v_row, _, v_outer, v_inner = _strides(pair_values, dim)
        arguments += [pair_buffer, pair_values, row, column, outer_stride, inner_stride, v_row, v_outer, v_inner]
    _write_columns_kernel[(batch, len(pairs))](
        columns,
        index_stride(columns, None, batch),
        buffer.shape[dim],
        outer,
        inner,
        *arguments,
        OUTER=triton.next_power_of_2(outer),
        INNER=triton.next_power_of_2(inner),
    )

"""A linear layer whose rows have the same bits whatever else is in the batch, for decode-sized inputs.

cuBLAS picks its kernel (tile shape, split-K) from the whole product's shape, so the first row of a
product with 14 rows can differ in its last bit from the same row's product alone: on an H100 that
happens for Llama-3-8B's 4,096 -> 1,024 key and value projections at 9 to 15 rows. A server decoding 14
requests in one step then gives a request other tokens than ``generate`` gives it alone, as soon as
a greedy choice is nearly tied.

Here every choice that orders a row's float32 sums follows from the weight's shape and the card,
never from the number of rows: each program multiplies ``BLOCK_M`` rows (padded with zeros) by
``BLOCK_N`` output columns, walking its range of the reduction in steps of ``BLOCK_K``; the
reduction is cut into :func:`reduction_splits` ranges (so that small products still fill the card);
a second kernel adds the ranges' partial sums in range order and rounds once to the output's dtype.
A row's arithmetic is then the same in a product of 1 row or of 64 (the idea of the batch-invariant
kernels in "Defeating Nondeterminism in LLM Inference", Thinking Machines Lab, 2025).

It is meant for decode steps (one token a row, bound by reading the weight). With ``batch_invariant`` the
runtime runs the LM head through it; the decoder layers' own projections go through the grouped kernel of
:mod:`omnikv_runtime.kernels.decode_linear` (row-invariant too, and without partial sums), and prefill
chunks, whose shape is the same whatever else the server runs, through ``torch.nn.functional.linear``.
"""

from __future__ import annotations

import torch

from omnikv_runtime.kernels.triton_support import TRITON_AVAILABLE, multiprocessor_count

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 128
PROGRAMS_PER_SM = 4  # the programs a product of one row tile aims for, per streaming multiprocessor

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _partial_products_kernel(
        x_ptr,
        stride_xm,
        w_ptr,
        stride_wn,
        out_ptr,
        stride_split,
        stride_om,
        rows,
        columns,
        reduction,
        per_split,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        tile_n, split, tile_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = offs_m < rows, offs_n < columns
        start = split * per_split
        stop = tl.minimum(start + per_split, reduction)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(start, stop, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            k_ok = offs_k < stop
            x = tl.load(
                x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                mask=m_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None],
                mask=n_ok[None, :] & k_ok[:, None],
                other=0.0,
            )
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
        target = out_ptr + split * stride_split + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
        tl.store(target, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _sum_splits_kernel(
        partial_ptr,
        stride_split,
        out_ptr,
        count,
        splits,
        HAS_BIAS: tl.constexpr,
        bias_ptr,
        columns,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < count
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for split in range(0, splits):  # in range order: the same sum for a row whatever the rows
            total += tl.load(partial_ptr + split * stride_split + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            total += tl.load(bias_ptr + offs % columns, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)


def reduction_splits(columns: int, reduction: int, multiprocessors: int) -> int:
    """Ranges the reduction of a ``[rows, reduction] x [reduction, columns]`` product is cut into: the power of
    two that brings the programs of one row tile nearest ``PROGRAMS_PER_SM`` per multiprocessor, each range
    keeping at least two ``BLOCK_K`` steps. It depends on the weight's shape and the card only."""
    tiles = -(-columns // BLOCK_N)
    steps = -(-reduction // BLOCK_K)
    wanted = PROGRAMS_PER_SM * multiprocessors / tiles
    splits = 1
    while splits * 2 <= wanted and splits * 2 * 2 <= steps:
        splits *= 2
    return splits


def invariant_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)``, each row computed the same way whatever the number of rows
    where that can be had: on CUDA with Triton, ``x`` in the weight's dtype. Elsewhere, torch's linear."""
    rows = x.numel() // max(x.shape[-1], 1)
    kernel_can = x.is_cuda and TRITON_AVAILABLE and x.dtype == weight.dtype and weight.stride(-1) == 1
    if not kernel_can or rows == 0:  # torch's linear (it also says what is wrong, if anything)
        return torch.nn.functional.linear(x, weight, bias)
    return invariant_linear_triton(x, weight, bias, multiprocessor_count(x.device))


def invariant_linear_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, multiprocessors: int
) -> torch.Tensor:
    """The Triton path of :func:`invariant_linear` (any row count; the tests run it under Triton's interpreter).

    Args:
        x: ``[..., in_features]``.
        weight: ``[out_features, in_features]`` with contiguous rows (an ``nn.Linear``'s weight).
        bias: ``[out_features]`` or None.
        multiprocessors: the card's streaming multiprocessors; the reduction's ranges follow it.
    """
    *lead, reduction = x.shape
    columns = weight.shape[0]
    if weight.shape[1] != reduction:
        raise ValueError(f"input of {reduction} features for a weight of shape {tuple(weight.shape)}")
    if weight.stride(-1) != 1:
        raise ValueError("the weight's rows must be contiguous (an nn.Linear weight's are)")
    flat = x.reshape(-1, reduction)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[0]
    splits = reduction_splits(columns, reduction, multiprocessors)
    per_split = triton.cdiv(triton.cdiv(reduction, BLOCK_K), splits) * BLOCK_K
    out = torch.empty(rows, columns, dtype=x.dtype, device=x.device)
    direct = splits == 1 and bias is None  # one range: the program's sum is the result
    partial = out[None] if direct else torch.empty(splits, rows, columns, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(columns, BLOCK_N), splits, triton.cdiv(rows, BLOCK_M))
    _partial_products_kernel[grid](
        flat,
        flat.stride(0),
        weight,
        weight.stride(0),
        partial,
        partial.stride(0),
        partial.stride(1),
        rows,
        columns,
        reduction,
        per_split,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # float32 stays float32, as torch's linear
        num_warps=4,
        num_stages=3,
    )
    if not direct:
        count, block = rows * columns, 1024
        _sum_splits_kernel[(triton.cdiv(count, block),)](
            partial,
            partial.stride(0),
            out,
            count,
            splits,
            bias is not None,
            bias if bias is not None else out,
            columns,
            BLOCK=block,
        )
    return out.reshape(*lead, columns)

"""Gather of selected token rows straight from pinned host memory, on the GPU, with Triton.

The host tier is token-major (``[batch, tokens, row]``, one row = every sparse layer of a segment,
keys and values), so a selected token is one contiguous read. This kernel runs on the GPU, reads
those rows through unified virtual addressing (pinned host memory is addressable from the GPU) at
indices that stay on the GPU, and writes them densely into a GPU buffer ``[batch, k, row]``.

It is persistent and narrow: ``num_programs`` CTAs (about 32) loop over the rows. Measured on an
H100 (``shared/probes/overlap_probe.py``, DESIGN.md), 32 CTAs reach the PCIe link's bandwidth and
leave the rest of the GPU to compute on another stream, where one CTA per row serialises with it.
Under ``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors (how CI tests it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

DEFAULT_PROGRAMS = 32
MAX_BLOCK = 4096  # elements of one row per inner step
TILE_ELEMENTS = 8192  # elements in flight per CTA per step (rows x block)


@triton.jit
def _gather_rows_kernel(
    source,  # [batch, tokens, row_elems], host (pinned) or device
    indices,  # [batch, k] int64, device
    target,  # [batch, k, row_elems], device, contiguous
    rows_total,  # batch * k
    k,
    row_elems,
    source_batch_stride,
    ROWS: tl.constexpr,  # rows in flight per iteration: small rows need several to fill the link
    BLOCK: tl.constexpr,  # elements per row per inner step
):
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    row_offsets = tl.arange(0, ROWS)
    columns = tl.arange(0, BLOCK)
    for first in range(program * ROWS, rows_total, programs * ROWS):
        jobs = tl.cast(first, tl.int64) + row_offsets  # int64: host arenas pass 2**31 elements
        live = jobs < rows_total
        tokens = tl.load(indices + jobs, mask=live, other=0).to(tl.int64)
        source_rows = source + (jobs // k) * source_batch_stride + tokens * row_elems
        target_rows = target + jobs * row_elems
        for start in range(0, row_elems, BLOCK):
            offsets = start + columns
            inside = live[:, None] & (offsets < row_elems)[None, :]
            values = tl.load(source_rows[:, None] + offsets[None, :], mask=inside)
            tl.store(target_rows[:, None] + offsets[None, :], values, mask=inside)


def gather_rows(
    source: torch.Tensor, indices: torch.Tensor, out: torch.Tensor, num_programs: int = DEFAULT_PROGRAMS
) -> torch.Tensor:
    """``out[b, j] = source[b, indices[b, j]]`` for rows of any shape, by the persistent kernel.

    Args:
        source: ``[batch, tokens, *row]``, contiguous in each row and across tokens (a host arena).
        indices: ``[batch, k]`` integer token indices (on the GPU; never copied to the host).
        out: ``[batch, k, *row]`` contiguous output, same dtype as ``source``.
        num_programs: CTAs of the persistent launch; few enough to leave SMs to compute.
    """
    batch, k = indices.shape
    if out.shape[:2] != (batch, k) or out.shape[2:] != source.shape[2:] or out.dtype != source.dtype:
        raise ValueError(
            f"out {tuple(out.shape)} {out.dtype} does not fit rows of {tuple(source.shape)} {source.dtype}"
        )
    if not out.is_contiguous() or source[0, 0].numel() * source.shape[1] != source[0].numel():
        raise ValueError("gather_rows needs a contiguous output and token-contiguous rows in the source")
    row_elems = source[0, 0].numel()
    if batch * k == 0 or row_elems == 0:
        return out
    block = min(MAX_BLOCK, triton.next_power_of_2(row_elems))
    rows = max(1, min(64, TILE_ELEMENTS // block))  # about 8K elements (16 KB of bf16) in flight per CTA
    programs = max(1, min(num_programs, triton.cdiv(batch * k, rows)))
    _gather_rows_kernel[(programs,)](
        source, indices.contiguous(), out, batch * k, k, row_elems, source.stride(0), ROWS=rows, BLOCK=block
    )
    return out

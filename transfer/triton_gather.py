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
MAX_BLOCK = 4096  # elements per load/store instruction group


@triton.jit
def _gather_rows_kernel(
    source,  # [batch, tokens, row_elems], host (pinned) or device
    indices,  # [batch, k] int64, device
    target,  # [batch, k, row_elems], device, contiguous
    rows_total,  # batch * k
    k,
    row_elems,
    source_batch_stride,
    BLOCK: tl.constexpr,
):
    program = tl.program_id(0)
    programs = tl.num_programs(0)
    for job in range(program, rows_total, programs):
        job64 = tl.cast(job, tl.int64)  # offsets past 2**31 elements are common in a host arena
        token = tl.load(indices + job64).to(tl.int64)
        source_row = source + (job64 // k) * source_batch_stride + token * row_elems
        target_row = target + job64 * row_elems
        for start in range(0, row_elems, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            inside = offsets < row_elems
            tl.store(target_row + offsets, tl.load(source_row + offsets, mask=inside), mask=inside)


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
    programs = max(1, min(num_programs, batch * k))
    _gather_rows_kernel[(programs,)](
        source, indices.contiguous(), out, batch * k, k, row_elems, source.stride(0), BLOCK=block
    )
    return out

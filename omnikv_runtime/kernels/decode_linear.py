"""Decode-step projections: several weights that read the same input in one kernel, each row's sum in one order.

A decode step multiplies a few rows (one token a request) by every weight of the model once, so its time is
the time to read the weights. On an H100 (device copy 2,990 GB/s), in CUDA graphs at Llama-3-8B's shapes,
cuBLAS reads the gate and up weights at 2.74 TB/s and the down weight at 2.65, but its three query, key
and value launches at 1.64 and the output projection at 2.05; it cuts most of these reductions into ranges
whose partial sums a second kernel adds (five extra kernels a layer).

Here one launch computes the query, key and value projections (three weights, one input), and another the
gate and up projections with the SiLU-gated product as its output, so the MLP's intermediate never goes to
memory in two halves. Each program multiplies ``BLOCK_M`` rows (padded with zeros) by ``BLOCK_N`` output
features of one weight and walks the whole reduction in steps of ``BLOCK_K``: no partial sums, no second
kernel, and a row's arithmetic does not depend on how many rows there are (the batch-invariance of
``generation.batch_invariant``). Same card and graphs: 2.51 TB/s for query/key/value, 2.38 for the output,
2.91 for gate/up with the product, 2.81 for down, at 1, 4 and 16 rows. At 64 rows it reads each weight
four times (once per ``BLOCK_M`` rows) and is 1.3-3.4x slower than cuBLAS, so the fused layers use it for
more than 16 rows only where ``batch_invariant`` asks for row-count-independent bits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from omnikv_runtime.kernels.triton_support import INTERPRETED, TRITON_AVAILABLE

BLOCK_M = 16
# launch shapes, the fastest of a sweep in CUDA graphs on an H100 at 1 and 4 rows (benchmarks/decode_linear.py):
# the gated launch reads two weights a step, so it keeps one stage fewer in flight
DEFAULT_SHAPE = {"BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}
GATED_SHAPE = {**DEFAULT_SHAPE, "num_stages": 3}

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _grouped_rows_kernel(
        x_ptr,
        stride_x,
        rows,
        reduction,
        w0_ptr,
        w1_ptr,
        w2_ptr,
        out0_ptr,
        out1_ptr,
        out2_ptr,
        residual_ptr,
        features0,
        features1,
        features2,
        tiles0,
        tiles01,
        GATED: tl.constexpr,
        RESIDUAL: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr,
        PRECISE_EXP: tl.constexpr,
    ):
        tile, tile_m = tl.program_id(0), tl.program_id(1)
        # which weight this program's features belong to (GATED: always the gate and the up weight together)
        if GATED or tile < tiles0:
            w_ptr, out_ptr, features = w0_ptr, out0_ptr, features0
        elif tile < tiles01:
            w_ptr, out_ptr, features, tile = w1_ptr, out1_ptr, features1, tile - tiles0
        else:
            w_ptr, out_ptr, features, tile = w2_ptr, out2_ptr, features2, tile - tiles01
        offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = offs_m < rows, offs_n < features
        x_rows = x_ptr + offs_m[:, None].to(tl.int64) * stride_x
        w_rows = offs_n[None, :].to(tl.int64) * reduction
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, reduction, BLOCK_K):
            offs_k = k + tl.arange(0, BLOCK_K)
            k_ok = offs_k < reduction
            x = tl.load(x_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = n_ok[None, :] & k_ok[:, None]
            w = tl.load(w_ptr + w_rows + offs_k[:, None], mask=w_mask, other=0.0)
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
            if GATED:
                up = tl.load(w1_ptr + w_rows + offs_k[:, None], mask=w_mask, other=0.0)
                acc_up = tl.dot(x, up, acc_up, input_precision=PRECISION)
        dtype = out_ptr.dtype.element_ty
        if GATED:  # rounded as transformers rounds silu(gate) * up: each product, the SiLU, the product
            gate = acc.to(dtype).to(tl.float32)
            denominator = 1.0 + (libdevice.exp(-gate) if PRECISE_EXP else tl.exp(-gate))
            silu = tl.div_rn(gate, denominator).to(dtype).to(tl.float32)
            acc = silu * acc_up.to(dtype).to(tl.float32)
        place = offs_m[:, None].to(tl.int64) * features + offs_n[None, :]
        inside = m_ok[:, None] & n_ok[None, :]
        if RESIDUAL:  # rounded as ``residual + x @ w.T`` is: the product, then the sum
            added = tl.load(residual_ptr + place, mask=inside, other=0.0).to(tl.float32)
            acc = acc.to(dtype).to(tl.float32) + added
        tl.store(out_ptr + place, acc.to(dtype), mask=inside)


def _launch(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    gated: bool,
    shape: dict | None,
    residual: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    shape = {**(GATED_SHAPE if gated else DEFAULT_SHAPE), **(shape or {})}
    *lead, reduction = x.shape
    for weight in weights:
        if weight.dim() != 2 or weight.shape[1] != reduction or weight.stride() != (reduction, 1):
            raise ValueError(f"a weight of shape {tuple(weight.shape)} for an input of {reduction} features")
        if weight.dtype != x.dtype or weight.device != x.device:
            raise ValueError(f"weight {weight.dtype} on {weight.device} for input {x.dtype} on {x.device}")
    flat = x.reshape(-1, reduction)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    rows = flat.shape[0]
    if residual is not None:
        residual = _residual_rows(residual, x, rows, weights[0].shape[0])
    outputs = [torch.empty(rows, w.shape[0], dtype=x.dtype, device=x.device) for w in weights[: 1 if gated else 3]]
    block_n = shape["BLOCK_N"]
    tiles = [triton.cdiv(w.shape[0], block_n) for w in weights]
    padded = [*weights, *weights[:1] * (3 - len(weights))]
    padded_out = [*outputs, *outputs[:1] * (3 - len(outputs))]
    features = [w.shape[0] for w in padded]
    grid = (tiles[0] if gated else sum(tiles), triton.cdiv(rows, BLOCK_M))
    _grouped_rows_kernel[grid](
        flat,
        flat.stride(0),
        rows,
        reduction,
        *padded,
        *padded_out,
        residual if residual is not None else padded_out[0],
        *features,
        tiles[0],
        tiles[0] + (tiles[1] if len(tiles) > 1 else 0),
        GATED=gated,
        RESIDUAL=residual is not None,
        BLOCK_M=BLOCK_M,
        BLOCK_N=block_n,
        BLOCK_K=shape["BLOCK_K"],
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        PRECISE_EXP=not INTERPRETED,
        num_warps=shape["num_warps"],
        num_stages=shape["num_stages"],
    )
    return [out.reshape(*lead, out.shape[-1]) for out in outputs]


def _residual_rows(residual: torch.Tensor, x: torch.Tensor, rows: int, features: int) -> torch.Tensor:
    """The residual as ``[rows, features]`` rows in a row-major block (a copy only where it is not one)."""
    wanted = (*x.shape[:-1], features)
    if tuple(residual.shape) != wanted or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(
            f"a residual of shape {tuple(residual.shape)} ({residual.dtype} on {residual.device}) for an output of "
            f"{wanted} ({x.dtype} on {x.device})"
        )
    return residual.reshape(rows, features).contiguous()


def grouped_linear(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    shape: dict | None = None,
    residual: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """``[x @ w.T for w in weights]`` (one to three bias-free weights of the same input width) in one launch.

    ``residual`` (one weight only): return ``residual + x @ w.T`` instead, the product rounded to ``x``'s dtype
    before the sum as torch rounds the two operations, so a decoder layer's residual add needs no launch of
    its own.
    """
    if not 1 <= len(weights) <= 3:
        raise ValueError(f"one to three weights in a group, not {len(weights)}")
    if residual is not None and len(weights) != 1:
        raise ValueError(f"a residual is added to one weight's product, not to a group of {len(weights)}")
    return _launch(x, weights, gated=False, shape=shape, residual=residual)


def gated_linear(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, shape: dict | None = None) -> torch.Tensor:
    """``silu(x @ gate.T) * (x @ up.T)``, each product rounded to ``x``'s dtype first, as transformers rounds it."""
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} weights differ in shape")
    return _launch(x, [gate, up], gated=True, shape=shape)[0]

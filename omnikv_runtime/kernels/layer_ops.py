"""Fused versions of a Llama decoder layer's small operations: RMSNorm, rotary embedding, SiLU gate.

transformers computes these with one torch kernel per arithmetic step: RMSNorm (Zhang and
Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019) is seven kernels, the rotary
embedding of queries and keys (Su et al., "RoFormer", 2021) about ten, the SiLU-gated MLP product
(Shazeer, "GLU Variants Improve Transformer", 2020) two. At decode time each touches a few
kilobytes and costs 1-2 µs of GPU time, so a 32-layer model spends more than a millisecond per
token on them even when the step is replayed from a CUDA graph. Each function here is one Triton
kernel on CUDA and the same torch expression as transformers elsewhere.

The kernels compute in float32 and round to the tensor's dtype where transformers' kernels round
(after each product and each sum). Results stay within one rounding of transformers': on the GPU
a product may be fused with the sum that follows it, and RMSNorm sums its squares in another
order. The torch functions (``*_torch``, used off CUDA) are transformers' expressions exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from omnikv_runtime.kernels.triton_support import INTERPRETED, TRITON_AVAILABLE

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice

    @triton.jit
    def _rms_norm_kernel(x_ptr, stride_x, weight_ptr, out_ptr, stride_out, columns, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.arange(0, BLOCK)
        inside = offsets < columns
        x = tl.load(x_ptr + row * stride_x + offsets, mask=inside, other=0.0).to(tl.float32)
        variance = tl.sum(x * x, axis=0) / columns
        normed = x * tl.math.rsqrt(variance + eps)
        normed = normed.to(x_ptr.dtype.element_ty).to(tl.float32)  # transformers casts back before the weight
        weight = tl.load(weight_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + offsets, (weight * normed).to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _rotate_heads(
        x_ptr,
        stride_h,
        out_ptr,
        heads,
        cos_lo,
        cos_hi,
        sin_lo,
        sin_hi,
        HALF,
        HEADS_PAD: tl.constexpr,
        HALF_PAD: tl.constexpr,
    ):
        head = tl.arange(0, HEADS_PAD)[:, None]
        column = tl.arange(0, HALF_PAD)[None, :]
        inside = (head < heads) & (column < HALF)
        low = tl.load(x_ptr + head * stride_h + column, mask=inside, other=0.0).to(tl.float32)
        high = tl.load(x_ptr + head * stride_h + HALF + column, mask=inside, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        # q * cos + rotate_half(q) * sin, rounded after each product and after the sum
        out_low = (low * cos_lo).to(dtype).to(tl.float32) + (-high * sin_lo).to(dtype).to(tl.float32)
        out_high = (high * cos_hi).to(dtype).to(tl.float32) + (low * sin_hi).to(dtype).to(tl.float32)
        out = out_ptr + head * (2 * HALF) + column
        tl.store(out, out_low.to(dtype), mask=inside)
        tl.store(out + HALF, out_high.to(dtype), mask=inside)

    @triton.jit
    def _rotary_kernel(
        q_ptr,
        q_stride_b,
        q_stride_s,
        q_stride_h,
        k_ptr,
        k_stride_b,
        k_stride_s,
        k_stride_h,
        cos_ptr,
        sin_ptr,
        cs_stride_b,
        cs_stride_s,
        q_out_ptr,
        k_out_ptr,
        seq_len,
        q_heads,
        k_heads,
        HALF,
        Q_PAD: tl.constexpr,
        K_PAD: tl.constexpr,
        HALF_PAD: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        b = row // seq_len
        s = row % seq_len
        column = tl.arange(0, HALF_PAD)[None, :]
        inside = column < HALF
        angles = b * cs_stride_b + s * cs_stride_s + column
        cos_lo = tl.load(cos_ptr + angles, mask=inside, other=0.0).to(tl.float32)
        cos_hi = tl.load(cos_ptr + angles + HALF, mask=inside, other=0.0).to(tl.float32)
        sin_lo = tl.load(sin_ptr + angles, mask=inside, other=0.0).to(tl.float32)
        sin_hi = tl.load(sin_ptr + angles + HALF, mask=inside, other=0.0).to(tl.float32)
        q_row = q_ptr + b * q_stride_b + s * q_stride_s
        _rotate_heads(
            q_row,
            q_stride_h,
            q_out_ptr + row * q_heads * 2 * HALF,
            q_heads,
            cos_lo,
            cos_hi,
            sin_lo,
            sin_hi,
            HALF,
            Q_PAD,
            HALF_PAD,
        )
        k_row = k_ptr + b * k_stride_b + s * k_stride_s
        _rotate_heads(
            k_row,
            k_stride_h,
            k_out_ptr + row * k_heads * 2 * HALF,
            k_heads,
            cos_lo,
            cos_hi,
            sin_lo,
            sin_hi,
            HALF,
            K_PAD,
            HALF_PAD,
        )

    @triton.jit
    def _silu_mul_kernel(
        gate_ptr, up_ptr, out_ptr, stride_gate, stride_up, columns, BLOCK: tl.constexpr, PRECISE_EXP: tl.constexpr
    ):
        row = tl.program_id(0).to(tl.int64)
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < columns
        gate = tl.load(gate_ptr + row * stride_gate + offsets, mask=inside, other=0.0).to(tl.float32)
        up = tl.load(up_ptr + row * stride_up + offsets, mask=inside, other=0.0).to(tl.float32)
        dtype = out_ptr.dtype.element_ty
        # torch's silu: x / (1 + expf(-x)), with an accurate exp and a correctly rounded division
        denominator = 1.0 + (libdevice.exp(-gate) if PRECISE_EXP else tl.exp(-gate))
        silu = tl.div_rn(gate, denominator).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * columns + offsets, (silu * up).to(dtype), mask=inside)


def _use_triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and TRITON_AVAILABLE


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x²) + eps))``, computed in float32, as transformers' Llama RMSNorm."""
    if not _use_triton(hidden) or hidden.stride(-1) != 1 or weight.dtype != hidden.dtype:
        return rms_norm_torch(hidden, weight, eps)
    columns = hidden.shape[-1]
    rows = hidden.reshape(-1, columns)
    out = torch.empty(rows.shape, dtype=hidden.dtype, device=hidden.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(columns)
        _rms_norm_kernel[(rows.shape[0],)](
            rows,
            rows.stride(0),
            weight,
            out,
            out.stride(0),
            columns,
            eps,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    return out.view(hidden.shape)


def rms_norm_torch(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The same function in torch ops, in transformers' order."""
    dtype = hidden.dtype
    hidden = hidden.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return weight * (hidden * torch.rsqrt(variance + eps)).to(dtype)


def rotary_embedding(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys rotated by position, returned head-major (``[batch, heads, seq, dim]`` views).

    Args:
        query: ``[batch, seq, q_heads, dim]``, unit stride in ``dim`` (a projection's output viewed by head).
        key: ``[batch, seq, kv_heads, dim]``, the same.
        cos, sin: ``[batch or 1, seq, dim]``, the model's rotary table at the tokens' positions.
    """
    usable = (
        _use_triton(query)
        and query.stride(-1) == 1
        and key.stride(-1) == 1
        and cos.stride(-1) == 1
        and cos.stride() == sin.stride()
        and query.shape[-1] % 2 == 0
        and query.dtype == key.dtype == cos.dtype == sin.dtype
    )
    if not usable:
        return rotary_embedding_torch(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
    batch, seq, q_heads, dim = query.shape
    k_heads = key.shape[2]
    q_out = torch.empty(batch, seq, q_heads, dim, dtype=query.dtype, device=query.device)
    k_out = torch.empty(batch, seq, k_heads, dim, dtype=key.dtype, device=key.device)
    if batch * seq:
        cos = cos.expand(batch, seq, dim)
        sin = sin.expand(batch, seq, dim)
        _rotary_kernel[(batch * seq,)](
            query,
            query.stride(0),
            query.stride(1),
            query.stride(2),
            key,
            key.stride(0),
            key.stride(1),
            key.stride(2),
            cos,
            sin,
            cos.stride(0),
            cos.stride(1),
            q_out,
            k_out,
            seq,
            q_heads,
            k_heads,
            dim // 2,
            Q_PAD=triton.next_power_of_2(q_heads),
            K_PAD=triton.next_power_of_2(k_heads),
            HALF_PAD=triton.next_power_of_2(dim // 2),
            num_warps=4,
        )
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[-x2, x1]`` for ``x = [x1, x2]`` split in halves of the last dimension: with ``cos`` and ``sin`` of the
    angles repeated over both halves, ``x * cos + rotate_half(x) * sin`` rotates each pair ``(x1[i], x2[i])``
    by its angle (the layout transformers' rotary embedding uses)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_embedding_torch(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function in torch ops, on head-major ``[batch, heads, seq, dim]`` inputs, as transformers."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return query * cos + rotate_half(query) * sin, key * cos + rotate_half(key) * sin


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, the SiLU-gated MLP's product, rounded as transformers rounds it."""
    usable = (
        _use_triton(gate)
        and gate.shape == up.shape
        and gate.stride(-1) == up.stride(-1) == 1
        and gate.dtype == up.dtype
    )
    if not usable:
        return silu_mul_torch(gate, up)
    columns = gate.shape[-1]
    gate_rows, up_rows = gate.reshape(-1, columns), up.reshape(-1, columns)
    out = torch.empty(gate_rows.shape, dtype=gate.dtype, device=gate.device)
    block = 1024
    if gate_rows.shape[0]:
        _silu_mul_kernel[(gate_rows.shape[0], triton.cdiv(columns, block))](
            gate_rows,
            up_rows,
            out,
            gate_rows.stride(0),
            up_rows.stride(0),
            columns,
            BLOCK=block,
            PRECISE_EXP=not INTERPRETED,  # the interpreter has no libdevice
            num_warps=4,
        )
    return out.view(gate.shape)


def silu_mul_torch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The same function in torch ops."""
    return F.silu(gate) * up

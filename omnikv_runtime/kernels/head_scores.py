"""A filter layer's token scores: the largest scaled ``q·k`` logit any query head gives a token.

OmniKV's ``last`` selector ranks context tokens by the maximum over heads of the current query's
logits (OmniKV: Hao et al., "Dynamic Context Selection for Efficient Long-Context LLMs", ICLR 2025).
Computed plainly, that materialises ``[batch, heads, tokens]`` float32 logits (16 MB per batch row
at 128K tokens and 32 heads) before reducing them. The Triton kernel reduces over heads in
registers and writes only ``[batch, tokens]``; each key row is read once for its whole query
group. Columns at or past ``limit`` (the selectable context, or causality) and columns where
``valid`` is False score ``-inf``. In a decode step on CUDA the filter layer's attention kernel writes
the same scores while it reads the keys (``decode_attention(..., head_max=...)``); this kernel serves
where it does not.
"""

from __future__ import annotations

import torch

from omnikv_runtime.kernels.triton_support import TRITON_AVAILABLE

if TRITON_AVAILABLE:
    import triton
    import triton.language as tl

    @triton.jit
    def _max_head_logits_kernel(
        q_ptr,
        stride_qb,
        stride_qh,
        k_ptr,
        stride_kb,
        stride_kt,
        stride_kh,
        out_ptr,
        stride_ob,
        limit_ptr,
        valid_ptr,
        stride_vb,
        tokens,
        kv_heads,
        head_dim,
        scale,
        GROUP: tl.constexpr,
        G_PAD: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_T: tl.constexpr,
        HAS_LIMIT: tl.constexpr,
        HAS_VALID: tl.constexpr,
        PRECISION: tl.constexpr,
    ):
        b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = cols < tokens
        if HAS_LIMIT:
            ok = ok & (cols < tl.load(limit_ptr).to(tl.int32))
        if HAS_VALID:
            ok = ok & (tl.load(valid_ptr + b * stride_vb + cols, mask=ok, other=0) != 0)
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, BLOCK_D)
        g_ok = offs_g < GROUP
        d_ok = offs_d < head_dim
        best = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        for h in range(0, kv_heads):
            heads = h * GROUP + offs_g
            q = tl.load(
                q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            k = tl.load(
                k_ptr + b * stride_kb + h * stride_kh + cols[:, None].to(tl.int64) * stride_kt + offs_d[None, :],
                mask=ok[:, None] & d_ok[None, :],
                other=0.0,
            )
            logits = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [G_PAD, BLOCK_T]
            logits = tl.where(g_ok[:, None], logits, float("-inf"))
            best = tl.maximum(best, tl.max(logits, 0))
        best = tl.where(ok, best * scale, float("-inf"))
        tl.store(out_ptr + b * stride_ob + cols, best, mask=cols < tokens)


BLOCK_T = 64


def max_head_logits(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    limit: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[batch, tokens]`` float32: max over query heads of ``scale * q·k``, ``-inf`` where hidden.

    Args:
        query: ``[batch, q_heads, head_dim]``, the current query (after RoPE).
        keys: ``[batch, tokens, kv_heads, head_dim]`` view, unit stride in ``head_dim``.
        scale: the attention's softmax scale (positive).
        limit: int64 ``[1]`` on the device: columns at or past it score ``-inf``.
        valid: bool ``[batch, tokens]``: columns where it is False score ``-inf``.
    """
    if not (query.is_cuda and TRITON_AVAILABLE):
        return max_head_logits_torch(query, keys, scale, limit, valid)
    batch, q_heads, head_dim = query.shape
    tokens, kv_heads = keys.shape[1], keys.shape[2]
    group = q_heads // kv_heads
    out = torch.empty(batch, tokens, dtype=torch.float32, device=query.device)
    valid_arg = valid.view(torch.uint8) if valid is not None and valid.dtype == torch.bool else valid
    _max_head_logits_kernel[(batch, triton.cdiv(tokens, BLOCK_T))](
        query,
        query.stride(0),
        query.stride(1),
        keys,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        out,
        out.stride(0),
        limit if limit is not None else query,
        valid_arg if valid is not None else query,
        valid.stride(0) if valid is not None else 0,
        tokens,
        kv_heads,
        head_dim,
        scale,
        GROUP=group,
        G_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_T=BLOCK_T,
        HAS_LIMIT=limit is not None,
        HAS_VALID=valid is not None,
        PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        num_warps=4,
    )
    return out


def max_head_logits_torch(
    query: torch.Tensor,
    keys: torch.Tensor,
    scale: float,
    limit: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same function with torch ops (half-precision keys stay in their dtype; float32 result)."""
    batch, q_heads, dim = query.shape
    kv_heads, tokens = keys.shape[2], keys.shape[1]
    # half-precision keys stay in their dtype (the matmul accumulates in float32): converting a long
    # context's keys to float32 would cost more memory traffic than the scoring itself
    compute = keys.dtype if keys.dtype in (torch.float16, torch.bfloat16) else torch.float32
    grouped = query.to(compute).reshape(batch, kv_heads, q_heads // kv_heads, dim)
    logits = torch.einsum("bhgd,bthd->bhgt", grouped, keys.to(compute)).float() * scale
    scores = logits.amax(dim=(1, 2))
    hidden = torch.zeros(batch, tokens, dtype=torch.bool, device=scores.device)
    if limit is not None:
        hidden = hidden | (torch.arange(tokens, device=scores.device)[None, :] >= limit.view(-1, 1))
    if valid is not None:
        hidden = hidden | ~valid[:, :tokens]
    return scores.masked_fill(hidden, float("-inf"))

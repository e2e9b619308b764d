"""The Triton split-K decode attention behind :func:`omnikv_runtime.kernels.decode_attention`.

Grid ``(batch * kv_heads, splits)``. A program loads the query rows of one KV head's group (padded
to 16 rows for the matrix instruction), walks one range of columns of source A (or, for the last
``splits_b`` programs, of source B) in blocks, and keeps an online softmax in base 2. It writes its
range's normalised output and log-sum-exp; the reduce kernel weights the ranges by their
log-sum-exp. The ranges do not depend on the batch (see :func:`_split_plan`), so neither do a row's
bits. Lengths, masks and indices are read on the device; columns past a length cost nothing but the
program's launch. Masked keys and values are loaded as zeros, so unwritten rows (even NaN) never
reach the output. For a filter layer the programs of the first source also write the OmniKV ``last``
policy's scores (``HEAD_MAX``): the largest logit of their query group for each column they read, merged
over KV heads with an atomic maximum, so the policy need not read the keys a second time.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# launch shape (benchmarks/decode_kernels.py --sweep measures alternatives on the card at hand;
# on an H200 at 128K tokens this one was the fastest at batch 4 and within 4% of it at batch 1, when
# the split plan still followed the batch)
TUNING = {
    "block": 128,  # columns per inner step (half of it for float32: shared memory)
    "programs_per_sm": 8,  # split programs per multiprocessor one request's grid aims at
    "num_warps": 4,
    "num_stages": 2,
    "min_split_columns": 256,  # fewer columns per program than this costs more in merging than it gains
}
REDUCE_BLOCK = 64  # ranges the merge kernel reads at a time
LOG2E = 1.4426950408889634


@triton.jit
def _attend_range(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_kt,
    stride_vt,
    index_base,
    mask_base,
    lo,
    hi,
    offs_d,
    d_ok,
    qk_scale,
    g_ok,
    head_max_base,
    head_max_columns,
    scale,
    BLOCK: tl.constexpr,
    HAS_INDEX: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HEAD_MAX: tl.constexpr,
    PRECISION: tl.constexpr,
):
    for start in range(lo, hi, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < hi
        if HAS_INDEX:
            tokens = tl.load(index_base + cols, mask=ok, other=0).to(tl.int64)
        else:
            tokens = cols.to(tl.int64)
        if HAS_MASK:
            ok = ok & (tl.load(mask_base + cols, mask=ok, other=0) != 0)
        load_ok = ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + tokens[:, None] * stride_kt + offs_d[None, :], mask=load_ok, other=0.0)
        raw = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [G_PAD, BLOCK]
        if HEAD_MAX:  # a filter layer's scores: the largest logit of this group's heads, max over KV heads
            best = tl.max(tl.where(g_ok[:, None], raw, float("-inf")), 0) * scale
            tl.atomic_max(head_max_base + cols, best, mask=ok & (cols < head_max_columns))
        s = tl.where(ok[None, :], raw * qk_scale, float("-inf"))  # base-2 logits
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + tokens[:, None] * stride_vt + offs_d[None, :], mask=load_ok, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _decode_split_kernel(
    q_ptr,
    stride_qb,
    stride_qh,
    a_k,
    a_v,
    a_kb,
    a_kt,
    a_kh,
    a_vb,
    a_vt,
    a_vh,
    a_columns,
    a_length,
    a_lb,
    a_mask,
    a_mb,
    a_index,
    a_ib,
    b_k,
    b_v,
    b_kb,
    b_kt,
    b_kh,
    b_vb,
    b_vt,
    b_vh,
    b_columns,
    b_length,
    b_lb,
    b_mask,
    b_mb,
    b_index,
    b_ib,
    part_out,
    part_lse,
    head_max,
    stride_hb,
    head_max_columns,
    kv_heads,
    head_dim,
    scale,
    qk_scale,
    chunk_a,
    chunk_b,
    splits_a,
    splits,
    GROUP: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK: tl.constexpr,
    A_LENGTH: tl.constexpr,
    A_MASK: tl.constexpr,
    A_INDEX: tl.constexpr,
    HAS_B: tl.constexpr,
    B_LENGTH: tl.constexpr,
    B_MASK: tl.constexpr,
    B_INDEX: tl.constexpr,
    HEAD_MAX: tl.constexpr,
    PRECISION: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    b = (row // kv_heads).to(tl.int64)
    h = (row % kv_heads).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, BLOCK_D)
    g_ok = offs_g < GROUP
    d_ok = offs_d < head_dim
    heads = h * GROUP + offs_g
    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([G_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([G_PAD], dtype=tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], dtype=tl.float32)
    if split < splits_a:
        limit = a_columns
        if A_LENGTH:
            limit = tl.minimum(limit, tl.load(a_length + b * a_lb).to(tl.int32))
        lo = split * chunk_a
        hi = tl.minimum(lo + chunk_a, limit)
        acc, m_i, l_i = _attend_range(
            acc,
            m_i,
            l_i,
            q,
            a_k + b * a_kb + h * a_kh,
            a_v + b * a_vb + h * a_vh,
            a_kt,
            a_vt,
            a_index + b * a_ib,
            a_mask + b * a_mb,
            lo,
            hi,
            offs_d,
            d_ok,
            qk_scale,
            g_ok,
            head_max + b * stride_hb,
            head_max_columns,
            scale,
            BLOCK,
            A_INDEX,
            A_MASK,
            HEAD_MAX,
            PRECISION,
        )
    else:
        if HAS_B:
            limit = b_columns
            if B_LENGTH:
                limit = tl.minimum(limit, tl.load(b_length + b * b_lb).to(tl.int32))
            lo = (split - splits_a) * chunk_b
            hi = tl.minimum(lo + chunk_b, limit)
            acc, m_i, l_i = _attend_range(
                acc,
                m_i,
                l_i,
                q,
                b_k + b * b_kb + h * b_kh,
                b_v + b * b_vb + h * b_vh,
                b_kt,
                b_vt,
                b_index + b * b_ib,
                b_mask + b * b_mb,
                lo,
                hi,
                offs_d,
                d_ok,
                qk_scale,
                g_ok,
                head_max,
                0,
                scale,
                BLOCK,
                B_INDEX,
                B_MASK,
                False,
                PRECISION,
            )
    seen = l_i > 0.0
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    slot = (b * kv_heads * GROUP + heads) * splits + split  # [G_PAD] rows of [batch, heads, splits]
    tl.store(part_lse + slot, lse, mask=g_ok)
    tl.store(part_out + slot[:, None] * head_dim + offs_d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_reduce_kernel(
    part_out,
    part_lse,
    out_ptr,
    stride_ob,
    stride_oh,
    q_heads,
    head_dim,
    splits,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one (batch, query head)
    b = row // q_heads
    h = row % q_heads
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    top = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    merged = tl.zeros([BLOCK_D], dtype=tl.float32)
    # ranges merge BLOCK_S at a time with a running maximum: a range past the row's length (log-sum-exp -inf)
    # adds exact zeros, so trailing empty ranges never change the bits of the result
    for start in range(0, splits, BLOCK_S):
        s_idx = start + offs_s
        s_ok = s_idx < splits
        lse = tl.load(part_lse + row * splits + s_idx, mask=s_ok, other=float("-inf"))
        new_top = tl.maximum(top, tl.max(lse, 0))
        safe_top = tl.where(new_top == float("-inf"), 0.0, new_top)
        alpha = tl.exp2(top - safe_top)
        weights = tl.exp2(lse - safe_top)
        parts = tl.load(
            part_out + (row * splits + s_idx)[:, None] * head_dim + offs_d[None, :],
            mask=s_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        total = total * alpha + tl.sum(weights, 0)
        merged = merged * alpha + tl.sum(parts * weights[:, None], 0)
        top = new_top
    merged = merged / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, merged.to(out_ptr.dtype.element_ty), mask=d_ok)


def dot_precision(dtype: torch.dtype) -> str:
    """Full float32 products for float32 inputs (Triton would use TF32); half types are exact anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _split_plan(columns: int, kv_heads: int, multiprocessors: int, block: int) -> tuple[int, int]:
    """(splits, columns per split) for one source.

    The columns per split depend on the source's columns, the KV heads and the card, never on the batch:
    the power of two (at least the block and ``min_split_columns``) nearest to the columns over the splits that
    give one request's KV heads ``programs_per_sm`` programs per multiprocessor (so one request gets 0.7 to 1.4
    times that many). A row is therefore summed in the same ranges, in the same order, whatever else is in the
    batch, and (through the power of two) mostly whatever the buffer's capacity: a request served in a batch
    gets the bits it gets alone. A larger batch runs more programs of the same size.
    """
    if columns == 0:
        return 1, block
    wanted = max(1, TUNING["programs_per_sm"] * multiprocessors // kv_heads)  # splits for one request
    exponent = max(0, round(math.log2(columns / wanted))) if columns > wanted else 0
    chunk = max(block, TUNING["min_split_columns"], 1 << exponent)
    return math.ceil(columns / chunk), chunk


def _source_arguments(source, dummy: torch.Tensor) -> list:
    keys, values = source.keys, source.values
    if keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError("decode attention needs keys and values with unit stride in head_dim")
    mask = source.mask if source.mask is not None else dummy
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    index = source.index if source.index is not None else dummy
    return [
        keys,
        values,
        keys.stride(0),
        keys.stride(1),
        keys.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        source.columns,
        source.length if source.length is not None else dummy,
        source.length.stride(0) if source.length is not None and source.length.numel() > 1 else 0,
        mask,
        mask.stride(0) if source.mask is not None else 0,
        index,
        index.stride(0) if source.index is not None else 0,
    ]


def decode_attention_triton(query, sources, scale: float, multiprocessors: int, out=None, head_max=None):
    """Launch the split and reduce kernels; see :func:`omnikv_runtime.kernels.decode_attention` (``head_max``:
    float32 ``[batch, width]``, filled here)."""
    batch, q_heads, head_dim = query.shape
    first = sources[0]
    kv_heads = first.keys.shape[2]
    if query.stride(-1) != 1:
        query = query.contiguous()
    group = q_heads // kv_heads
    rows = batch * kv_heads
    block = TUNING["block"] if query.element_size() <= 2 else TUNING["block"] // 2
    splits_a, chunk_a = _split_plan(first.columns, kv_heads, multiprocessors, block)
    second = sources[1] if len(sources) > 1 else None
    splits_b, chunk_b = (
        _split_plan(second.columns, kv_heads, multiprocessors, block) if second is not None else (0, block)
    )
    splits = splits_a + splits_b
    part_out = torch.empty(batch, q_heads, splits, head_dim, dtype=torch.float32, device=query.device)
    part_lse = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=query.device)
    dummy = query  # passed for a missing length, mask or index: never read (the kernel's flags say so)
    a_args = _source_arguments(first, dummy)
    b_args = _source_arguments(second, dummy) if second is not None else a_args
    if head_max is not None:
        head_max.fill_(float("-inf"))  # columns no program reaches (hidden, past the length) stay there
    _decode_split_kernel[(rows, splits)](
        query,
        query.stride(0),
        query.stride(1),
        *a_args,
        *b_args,
        part_out,
        part_lse,
        head_max if head_max is not None else part_lse,
        head_max.stride(0) if head_max is not None else 0,
        head_max.shape[1] if head_max is not None else 0,
        kv_heads,
        head_dim,
        scale,
        scale * LOG2E,
        chunk_a,
        chunk_b,
        splits_a,
        splits,
        GROUP=group,
        G_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK=block,
        A_LENGTH=first.length is not None,
        A_MASK=first.mask is not None,
        A_INDEX=first.index is not None,
        HAS_B=second is not None,
        B_LENGTH=second is not None and second.length is not None,
        B_MASK=second is not None and second.mask is not None,
        B_INDEX=second is not None and second.index is not None,
        HEAD_MAX=head_max is not None,
        PRECISION=dot_precision(query.dtype),
        num_warps=TUNING["num_warps"],
        num_stages=TUNING["num_stages"],
    )
    if out is None:
        out = torch.empty(batch, q_heads, head_dim, dtype=query.dtype, device=query.device)
    _decode_reduce_kernel[(batch * q_heads,)](
        part_out,
        part_lse,
        out,
        out.stride(0),
        out.stride(1),
        q_heads,
        head_dim,
        splits,
        BLOCK_S=REDUCE_BLOCK,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out

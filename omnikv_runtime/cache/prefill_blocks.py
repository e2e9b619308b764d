"""A prefill chunk's attention over a sparse layer's earlier tokens, read back from the host tier in blocks.

A sparse layer keeps its KV in its segment's host arena. A chunk after the first must attend to
every earlier token of the layer; reading them all back at once would make the chunk's GPU memory
grow with the context. Instead :func:`attend_over_blocks` reads them ``block_tokens`` at a time,
attends the chunk's queries to each block, and merges the blocks' results by their log-sum-exp
(each block's softmax is exact over its columns; scaling two partial results by ``exp(lse - max)``
and renormalising gives the softmax over both), in float32; the chunk's own keys come last, with the
causal mask. The next block is read while one is computed (:meth:`HostArena.prefetch` starts it on
the transfer stream on CUDA; elsewhere reads are plain copies in order), so at most two blocks are
on the device at a time, whatever the context.

A block without a mask runs through a fused kernel that returns its log-sum-exp (on CUDA in half
precision cuDNN, else FlashAttention-2; on CPU torch's flash kernel), so no ``[chunk, block]``
score matrix is built; a padded batch's masked blocks (and what no kernel takes) are computed with
matmuls in float32.
GQA (fewer KV heads than query heads) is handled by grouping the query heads, never by repeating KV.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from omnikv_runtime.errors import UnsupportedModelError
from omnikv_runtime.transfer import HostArena

# a block's softmax result: output [batch, heads, queries, head_dim] and log-sum-exp [batch, heads, queries, 1],
# both float32; a query that may attend to none of the block's columns has output 0 and log-sum-exp -inf
Partial = tuple[torch.Tensor, torch.Tensor]

logger = logging.getLogger(__name__)
_declined: list[RuntimeError] = []  # the first time the fused kernels declined a block (logged once)


@dataclass
class EarlierKV:
    """Where a sparse layer's tokens before the current chunk live, and how to read them back."""

    arena: HostArena
    slot: int  # the layer's place in its segment's arena rows
    tokens: int  # tokens stored before the chunk
    block_tokens: int  # tokens read back at a time

    def blocks(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each block, in order."""
        return [
            (start, min(start + self.block_tokens, self.tokens)) for start in range(0, self.tokens, self.block_tokens)
        ]


def check_attention_options(kwargs: dict) -> None:
    """Refuse attention options the blockwise prefill does not compute (no supported family sets them)."""
    for name in ("softcap", "sliding_window"):
        if kwargs.get(name) is not None:
            raise UnsupportedModelError(
                f"the model's attention passes {name}={kwargs[name]!r}: the runtime's prefill over the host tier "
                "computes plain softmax attention over every earlier token, without logit softcapping or a "
                "sliding window; run this model without the runtime"
            )


def attend_over_blocks(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    earlier: EarlierKV,
    attention_mask: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Attention of a chunk's ``query`` ``[batch, heads, c, dim]`` over ``earlier``'s tokens, then the chunk's
    own ``keys``/``values`` ``[batch, kv_heads, c, dim]`` (causal). ``attention_mask`` is the model's mask over
    all ``earlier.tokens + c`` columns (a ``[batch, 1, c, columns]`` bool or additive mask, a ``[batch,
    columns]`` padding mask, or None: every column). Returns ``[batch, c, heads, dim]`` in the query's dtype."""
    count, past = query.shape[2], earlier.tokens
    merged: Partial | None = None
    blocks = earlier.blocks()
    for index, (start, stop) in enumerate(blocks):
        block_keys, block_values = earlier.arena.read(earlier.slot, stop, start)
        if index + 1 < len(blocks):  # read the next block while this one is computed
            earlier.arena.prefetch(earlier.slot, blocks[index + 1][1], blocks[index + 1][0])
        allowed = allowed_columns(attention_mask, start, stop, count)
        if allowed is not None and bool(allowed.all()):  # past a row's padding: a fused kernel may take it
            allowed = None
        merged = merge(merged, block_attention(query, block_keys, block_values, scaling, allowed))
    allowed = allowed_columns(attention_mask, past, past + count, count)
    output, _ = merge(merged, block_attention(query, keys, values, scaling, allowed, causal=True))
    return output.to(query.dtype).transpose(1, 2).contiguous()


def allowed_columns(mask: torch.Tensor | None, start: int, stop: int, queries: int) -> torch.Tensor | None:
    """Columns ``start..stop`` of the model's attention mask as a bool ``[batch, 1, queries | 1, n]`` (True:
    may attend), or None when there is no mask."""
    if mask is None:
        return None
    if mask.dim() == 2:  # a [batch, columns] padding mask (flash-attention style)
        return mask[:, None, None, start:stop].bool()
    block = mask[:, :, -queries:, start:stop]
    if block.dtype == torch.bool:
        return block
    if block.is_floating_point():  # additive: 0 where allowed, the dtype's minimum (or -inf) where not
        return block > torch.finfo(block.dtype).min / 2
    return block != 0


def block_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    allowed: torch.Tensor | None = None,
    causal: bool = False,
) -> Partial:
    """Softmax attention of ``query`` ``[batch, heads, c, dim]`` over ``keys``/``values`` ``[batch, kv_heads, n,
    dim]`` alone, with its log-sum-exp (float32). ``causal``: the last query sees every key, the diagonal at the
    bottom right; ``allowed``: a bool mask broadcastable to ``[batch, 1, c, n]``."""
    fused = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] % 8 == 0
    if fused and allowed is None and (not causal or keys.shape[2] == query.shape[2]):
        try:
            return _fused_block(query, keys.contiguous(), values.contiguous(), scaling, causal)
        except RuntimeError as error:  # neither fused kernel takes these shapes
            if not _declined:
                _declined.append(error)
                logger.warning(
                    "prefill: no fused attention kernel took a block of %s keys (%s); blocks are computed with "
                    "matmuls, which hold a [chunk, block] float32 score matrix per head",
                    tuple(keys.shape),
                    error,
                )
    if not query.is_cuda and allowed is None and (not causal or keys.shape[2] == query.shape[2]):
        try:
            return _cpu_flash_block(query, keys, values, scaling, causal)
        except RuntimeError:  # a dtype or shape the CPU kernel does not take: the matmuls below
            pass
    batch, heads, count, dim = query.shape
    kv_heads, columns = keys.shape[1], keys.shape[2]
    grouped = query.float().reshape(batch, kv_heads, heads // kv_heads, count, dim)
    scores = torch.matmul(grouped, keys.float()[:, :, None].transpose(-1, -2)) * scaling  # [b, kv, g, c, n]
    if causal:
        below = torch.ones(1, 1, count, columns, dtype=torch.bool, device=query.device).tril(columns - count)
        allowed = below if allowed is None else allowed & below
    if allowed is not None:  # [batch | 1, 1, c | 1, n] -> the scores' [batch, kv_heads, group, c, n]
        scores.masked_fill_(~allowed[:, :, None], float("-inf"))
    top = scores.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # a query with no column: weights all 0
    weights = torch.exp(scores - top)
    total = weights.sum(dim=-1, keepdim=True)
    output = torch.matmul(weights, values.float()[:, :, None]) / total.clamp_min(torch.finfo(torch.float32).tiny)
    lse = top + torch.log(total)
    return output.reshape(batch, heads, count, dim), lse.reshape(batch, heads, count, 1)


def _fused_block(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, causal: bool
) -> Partial:
    """cuDNN's fused attention with its log-sum-exp, else FlashAttention-2's (grouped KV heads as they are)."""
    batch, heads, count, _ = query.shape
    try:
        cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
        output, lse = cudnn(query, keys, values, None, True, 0.0, causal, False, scale=scaling)[:2]
    except RuntimeError:  # cuDNN missing or declining these shapes
        flash = torch.ops.aten._scaled_dot_product_flash_attention
        output, lse = flash(query, keys, values, 0.0, is_causal=causal, return_debug_mask=False, scale=scaling)[:2]
    return output.float(), lse.float().reshape(batch, heads, count, 1)


def _cpu_flash_block(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scaling: float, causal: bool
) -> Partial:
    """torch's CPU flash attention with its log-sum-exp. Without a causal mask each KV head's group of
    query heads runs as one longer sequence of queries (no KV copy); the causal (square) block repeats
    its KV heads, a chunk's worth."""
    batch, heads, count, dim = query.shape
    kv_heads = keys.shape[1]
    if causal:
        groups = heads // kv_heads
        keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    else:
        query = query.reshape(batch, kv_heads, heads // kv_heads * count, dim)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    output, lse = flash(query, keys.contiguous(), values.contiguous(), 0.0, causal, scale=scaling)
    return output.float().reshape(batch, heads, count, dim), lse.float().reshape(batch, heads, count, 1)


def merge(first: Partial | None, second: Partial) -> Partial:
    """The softmax result over the columns of both partial results (``first`` None: ``second``)."""
    if first is None:
        return second
    (first_out, first_lse), (second_out, second_lse) = first, second
    top = torch.maximum(first_lse, second_lse)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    first_weight, second_weight = torch.exp(first_lse - top), torch.exp(second_lse - top)
    total = first_weight + second_weight
    output = (first_out * first_weight + second_out * second_weight) / total.clamp_min(torch.finfo(torch.float32).tiny)
    return output, top + torch.log(total)

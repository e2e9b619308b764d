"""InfLLM-style block retrieval: representative keys per block, top blocks per step.

From Xiao et al., "InfLLM: Training-Free Long-Context Extrapolation for LLMs with an Efficient
Context Memory" (NeurIPS 2024): distant context is stored in blocks; each block is represented by
a few of its keys (its most attended tokens), a block's relevance to the current query is the
query's dot product with those representative keys, and each step attends the initial tokens, a
local window and the top blocks. Here a block is ``block_size`` consecutive context tokens; since
a policy sees no prompt queries of the block's own time, a token's representativeness is its
key's dot product with the block's mean key (keys stand in for the block's queries), the top
``representatives`` per block follow from the keys alone (recomputed each step: cheap), and
relevance is summed over representatives and query heads. The budget holds ``init_tokens``
initial tokens, ``local_ratio`` of it as the latest context tokens, and whole blocks best first.
Lossless: the next step may retrieve other blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnikv_runtime.config.sections import MAX_TOKENS
from omnikv_runtime.policies.base import (
    ScoredPolicy,
    SelectionContext,
    causal_columns,
    first_valid,
    last_valid,
    ranked_groups,
)
from omnikv_runtime.policies.paging import paged
from omnikv_runtime.policies.params import bounded
from omnikv_runtime.policies.registry import register_selection_policy


@register_selection_policy
@dataclass
class InfLLMPolicy(ScoredPolicy):
    """Initial tokens, a local window, and the blocks whose representative keys best match the query."""

    name = "infllm"
    graph_safe = True

    block_size: int = bounded(16, 1, 4096)  # consecutive context tokens per block
    representatives: int = bounded(4, 1, 4096)  # representative keys per block, at most block_size
    init_tokens: int = bounded(4, 0, MAX_TOKENS)  # first real tokens always kept
    local_ratio: float = bounded(0.25, 0.0, 1.0)  # share of the budget kept for the latest tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.representatives > self.block_size:
            raise ValueError(
                f"representatives must be at most block_size, got {self.representatives} > {self.block_size}"
            )

    def _representatives(self, ctx: SelectionContext, usable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Representative keys ``[batch, kv_heads, blocks, r, dim]`` and which are real ``[batch, blocks, r]``."""
        keys, real = paged(ctx.keys.float(), usable, self.block_size)  # [batch, kv_heads, blocks, block_size, dim]
        batch, kv_heads, blocks, _, dim = keys.shape
        weights = real[:, None, :, :, None].float()
        mean = (keys * weights).sum(3) / weights.sum(3).clamp(min=1.0)  # [batch, kv_heads, blocks, dim]
        fit = torch.einsum("bhnsd,bhnd->bns", keys, mean).masked_fill(~real, float("-inf"))
        chosen = torch.topk(fit, self.representatives, dim=-1).indices  # [batch, blocks, r]
        ok = real.gather(2, chosen)
        index = chosen[:, None, :, :, None].expand(batch, kv_heads, blocks, self.representatives, dim)
        reps = keys.gather(3, index)
        return reps, ok

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        batch, kv_heads, length, _ = ctx.keys.shape
        usable = ctx.valid & causal_columns(ctx)[None, :]
        reps, ok = self._representatives(ctx, usable)
        query = ctx.queries[:, :, -1].float()
        grouped = query.reshape(batch, kv_heads, query.shape[1] // kv_heads, -1)
        relevance = torch.einsum("bhgd,bhnrd->bnr", grouped, reps)  # summed over the heads of each group
        relevance = relevance.masked_fill(~ok, 0.0).sum(-1)
        relevance = relevance.masked_fill(~ok.any(-1), float("-inf"))  # a block of padding only
        scores = ranked_groups(relevance, self.block_size, length)
        top = scores.amax() + 1.0
        scores = scores + last_valid(ctx, int(ctx.token_budget * self.local_ratio)) * top
        scores = scores + first_valid(usable, self.init_tokens) * 2 * top
        return scores.masked_fill(~causal_columns(ctx)[None, :], -1.0)

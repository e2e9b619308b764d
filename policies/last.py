"""OmniKV ``last``: the last query's attention logits, max over heads.

From OmniKV (Hao et al., "OmniKV: Dynamic Context Selection for Efficient Long-Context LLMs",
ICLR 2025): a filter layer ranks every context token by the largest raw q·k logit any head of
the current query gives it, and the following sparse layers attend to the top-k tokens. Lossless:
the full KV is kept; selection only decides what is read this step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnikv_runtime.kernels import max_head_logits
from omnikv_runtime.policies.base import ScoredPolicy, SelectionContext
from omnikv_runtime.policies.registry import register_selection_policy


@register_selection_policy
@dataclass
class LastQueryPolicy(ScoredPolicy):
    """Top-k tokens by max-over-heads logit of the current query (the original example config's selector)."""

    name = "last"
    graph_safe = True
    tensor_parallel = True
    reads_head_max_logits = True

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        if ctx.head_max_logits is not None:  # the decode attention scored the keys as it read them
            return ctx.max_over_ranks(ctx.head_max_logits.masked_fill(~ctx.valid, float("-inf")))
        # fused on CUDA: the reduction over heads never materialises [batch, heads, tokens], and
        # hidden columns (padding, the future) come out at -inf
        limit = ctx.query_positions[-1:].to(ctx.keys.device) + 1  # causality: columns up to the query's own
        keys = ctx.keys.transpose(1, 2)
        scores = max_head_logits(ctx.queries[:, :, -1], keys, ctx.scaling, limit=limit, valid=ctx.valid)
        return ctx.max_over_ranks(scores)

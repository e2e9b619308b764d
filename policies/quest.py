"""Quest: query-aware page selection from per-page min/max key bounds.

From Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (ICML
2024): the KV cache is split into pages; each page keeps the elementwise minimum and maximum of its
keys, which bound ``q·k`` for any key in it by ``sum_d max(q_d min_d, q_d max_d)``. At each decode
step the current query's bound ranks the pages and the top pages are attended. Here a page is
``page_size`` consecutive context tokens (padding excluded from its bounds), a page's score is the
largest bound over query heads, and whole pages are taken best first until the budget is full (the
last one partly). Lossless: nothing is dropped; the next step may pick other pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnikv_runtime.policies.base import ScoredPolicy, SelectionContext, causal_columns, ranked_groups
from omnikv_runtime.policies.paging import paged
from omnikv_runtime.policies.params import bounded
from omnikv_runtime.policies.registry import register_selection_policy


@register_selection_policy
@dataclass
class QuestPolicy(ScoredPolicy):
    """Top pages by the current query's upper bound on ``q·k`` from page-wise key min/max."""

    name = "quest"
    graph_safe = True

    page_size: int = bounded(16, 1, 4096)  # consecutive context tokens per page

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        kv_heads, length = ctx.keys.shape[1:3]
        usable = ctx.valid & causal_columns(ctx)[None, :]
        keys, usable = paged(ctx.keys.float(), usable, self.page_size)  # [batch, kv_heads, pages, page_size, dim]
        usable = usable[:, None, :, :, None]
        lo = keys.masked_fill(~usable, float("inf")).amin(dim=3)  # [batch, kv_heads, pages, dim]
        hi = keys.masked_fill(~usable, float("-inf")).amax(dim=3)
        query = ctx.queries[:, :, -1].float()  # [batch, q_heads, dim]
        group = query.shape[1] // kv_heads
        lo, hi = lo.repeat_interleave(group, dim=1), hi.repeat_interleave(group, dim=1)
        bound = torch.maximum(query[:, :, None] * lo, query[:, :, None] * hi).sum(-1)  # [batch, q_heads, pages]
        bound = bound.nan_to_num(float("-inf"), posinf=float("-inf"))  # empty page: inf * 0 or inf
        page_scores = bound.amax(dim=1)
        scores = ranked_groups(page_scores, self.page_size, length)
        return scores.masked_fill(~causal_columns(ctx)[None, :], -1.0)

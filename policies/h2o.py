"""H2O: heavy hitters by accumulated attention, plus recent tokens.

From Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language
Models" (NeurIPS 2023): a few tokens collect most of the attention mass summed over queries; a
cache that keeps these heavy hitters and the most recent tokens, evicting the token of lowest
accumulated attention as it goes, loses little. Here the accumulated score of a context token is
its softmax attention summed over the filter layer's last ``window_size`` queries (the prompt's
queries, up to that many, at the first decode step) and averaged over heads; each later step adds
the current query's attention over the tokens still alive. ``recent_ratio`` of the budget goes to
the latest context tokens, the rest to the heaviest hitters. Lossy: a token outside the selection
is dropped for good, so with a fixed budget the first decode step decides the kept set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnikv_runtime.config.sections import MAX_WINDOW
from omnikv_runtime.policies.base import SelectionContext, last_valid
from omnikv_runtime.policies.lossy import LayerState, LossyPolicy, window_attention
from omnikv_runtime.policies.params import bounded
from omnikv_runtime.policies.registry import register_selection_policy


@register_selection_policy
@dataclass
class H2OPolicy(LossyPolicy):
    """Heavy hitters (accumulated attention) plus ``recent_ratio`` of the budget as recent tokens."""

    name = "h2o"

    window_size: int = bounded(4096, 1, MAX_WINDOW)  # prompt queries whose attention seeds the scores
    recent_ratio: float = bounded(0.5, 0.0, 1.0)  # share of the budget kept for the latest tokens

    def rank(self, ctx: SelectionContext, state: LayerState) -> torch.Tensor:
        keep = state.alive & ctx.valid
        attention = window_attention(ctx, keep, last_only=not state.first).mean(dim=1)  # [batch, context]
        accumulated = state.extra.get("accumulated")
        if accumulated is None or accumulated.shape != attention.shape:
            accumulated = torch.zeros_like(attention)
        accumulated = accumulated + attention
        state.extra["accumulated"] = accumulated
        recent = last_valid(ctx, int(ctx.token_budget * self.recent_ratio))
        return accumulated + recent * (accumulated.amax() + 1.0)

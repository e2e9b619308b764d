"""SnapKV: observation-window voting with pooling, once at the end of the prefill.

From Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024):
the attention of the prompt's last queries (the observation window) already shows which earlier
tokens generation will need; SnapKV sums that attention over the window, smooths it with a 1-D
pooling so a chosen token brings its neighbours, keeps the top tokens plus the window itself, and
compresses the cache once. Here the window is the filter layer's last ``window_size`` queries at the
first decode step (the prompt's end), heads vote by summed pooled attention, and the selection is
made once. Lossy: everything else is dropped for good.
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
class SnapKVPolicy(LossyPolicy):
    """Pooled observation-window attention at the first decode step; the window itself is always kept."""

    name = "snapkv"

    window_size: int = bounded(32, 1, MAX_WINDOW)  # the observation window: the prompt's last queries
    kernel_size: int = bounded(7, 1, 1023)  # width of the pooling, odd

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size}")

    def rank(self, ctx: SelectionContext, state: LayerState) -> torch.Tensor:
        if not state.first and "votes" in state.extra:
            return state.extra["votes"]  # compressed once; the alive mask holds the result
        attention = window_attention(ctx, ctx.valid)  # [batch, q_heads, context]
        pad = self.kernel_size // 2
        pooled = torch.nn.functional.max_pool1d(attention, self.kernel_size, stride=1, padding=pad)
        votes = pooled.sum(dim=1)
        window = min(self.window_size, ctx.token_budget // 2)
        votes = votes + last_valid(ctx, window) * (votes.amax() + 1.0)
        state.extra["votes"] = votes
        return votes

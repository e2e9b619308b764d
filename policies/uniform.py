"""OmniKV ``uniform``: softmax attention of a window of recent queries, equally weighted.

From OmniKV (Hao et al., ICLR 2025), as its code computes it: the filter layer keeps its last
``window_size`` queries (the prompt's tail after prefill, then each decode step's). Each query's
softmax attention over the context is maxed over heads, and the window's queries are summed. The
tokens whose own query is still in the window (the prompt's last ``window_size - step`` tokens at
decode step ``step``) are left out of that scoring and always selected. Lossless.
"""

from __future__ import annotations

import torch

from omnikv_runtime.policies.base import SelectionContext, SelectionPolicy, seed_window_scores


class UniformWindowPolicy(SelectionPolicy):
    """Top-k tokens by the summed max-over-heads softmax attention of the last ``window_size`` queries."""

    name = "uniform"
    graph_safe = True

    def __init__(self, window_size: int = 16) -> None:
        super().__init__(window_size=window_size)

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        return seed_window_scores(ctx, torch.ones(self.window_size))

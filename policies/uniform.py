"""OmniKV ``uniform``: attention averaged over a window of recent queries, max over heads.

From OmniKV (Hao et al., ICLR 2025): scoring with the last ``window_size`` queries of the filter
layer (prompt tail at prefill, then each decode step's query), equally weighted, smooths the
selection across steps. Lossless.
"""

from __future__ import annotations

import torch

from omnikv_runtime.policies.base import SelectionContext, SelectionPolicy, windowed_softmax_scores


class UniformWindowPolicy(SelectionPolicy):
    """Top-k tokens by the mean softmax attention of the last ``window_size`` queries."""

    name = "uniform"
    graph_safe = True

    def __init__(self, window_size: int = 16) -> None:
        super().__init__(window_size=window_size)

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        return windowed_softmax_scores(ctx, torch.ones(self.window_size))

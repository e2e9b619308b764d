"""OmniKV ``exp``: attention of recent queries with exponentially decaying weights, max over heads.

From OmniKV (Hao et al., ICLR 2025): like ``uniform`` over the last ``window_size`` queries, but a
query ``a`` steps old weighs ``decay ** a`` (default 0.5), so the current query dominates while
recent ones still vote. Lossless.
"""

from __future__ import annotations

import torch

from omnikv_runtime.policies.base import SelectionContext, SelectionPolicy, windowed_softmax_scores


class ExpWindowPolicy(SelectionPolicy):
    """Top-k tokens by exponentially weighted softmax attention of recent queries."""

    name = "exp"
    graph_safe = True

    def __init__(self, window_size: int = 16, decay: float = 0.5) -> None:
        super().__init__(window_size=window_size)
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        self.decay = decay

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        ages = torch.arange(self.window_size - 1, -1, -1, dtype=torch.float32)  # oldest first
        return windowed_softmax_scores(ctx, self.decay**ages)

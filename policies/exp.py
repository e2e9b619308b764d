"""OmniKV ``exp``: softmax attention of a window of recent queries, weights halving with age.

From OmniKV (Hao et al., ICLR 2025), as its code computes it: like ``uniform`` (per query, max over
heads, then summed over the window; the window's own prompt tokens always selected), but a query
``a`` steps older than the current one weighs ``decay ** a`` (the original's 0.5 by default), so the
current query dominates while recent ones still vote. Lossless.
"""

from __future__ import annotations

import torch

from omnikv_runtime.policies.base import SelectionContext, SelectionPolicy, seed_window_scores


class ExpWindowPolicy(SelectionPolicy):
    """Top-k tokens by exponentially weighted softmax attention of recent queries."""

    name = "exp"
    graph_safe = True
    limits = {**SelectionPolicy.limits, "decay": (0.0, 1.0)}

    def __init__(self, window_size: int = 16, decay: float = 0.5) -> None:
        super().__init__(window_size=window_size)
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        self.decay = decay

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        ages = torch.arange(self.window_size - 1, -1, -1, dtype=torch.float32)  # oldest first
        return seed_window_scores(ctx, self.decay**ages)

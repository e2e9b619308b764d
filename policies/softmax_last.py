"""OmniKV ``softmax_last``: the last query's per-head attention probabilities, max over heads.

From OmniKV (Hao et al., ICLR 2025). Like ``last`` but each head's logits are softmax-normalised
first, so a head with a flat distribution cannot outvote a sharp one by scale alone. Lossless.
"""

from __future__ import annotations

import torch

from omnikv_runtime.policies.base import SelectionContext, SelectionPolicy, windowed_softmax_scores


class SoftmaxLastPolicy(SelectionPolicy):
    """Top-k tokens by max over heads of the current query's softmax attention."""

    name = "softmax_last"
    graph_safe = True

    def __init__(self, window_size: int = 1) -> None:
        super().__init__(window_size=1)

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        return windowed_softmax_scores(ctx, torch.ones(1))

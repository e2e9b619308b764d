"""OmniKV ``softmax_last``: the last query's per-head attention probabilities, max over heads.

From OmniKV (Hao et al., ICLR 2025). Like ``last`` but each head's logits are softmax-normalised
first, so a head with a flat distribution cannot outvote a sharp one by scale alone. Lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnikv_runtime.policies.base import ScoredPolicy, SelectionContext, windowed_softmax_scores
from omnikv_runtime.policies.registry import register_selection_policy


@register_selection_policy
@dataclass
class SoftmaxLastPolicy(ScoredPolicy):
    """Top-k tokens by max over heads of the current query's softmax attention."""

    name = "softmax_last"
    graph_safe = True
    tensor_parallel = True

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        return windowed_softmax_scores(ctx, torch.ones(1))

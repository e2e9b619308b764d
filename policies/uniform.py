"""OmniKV ``uniform``: softmax attention of a window of recent queries, equally weighted.

From OmniKV (Hao et al., ICLR 2025), as its code computes it: the filter layer keeps its last
``window_size`` queries (the prompt's tail after prefill, then each decode step's) and scores all of
them at the current step's position (the original rotates the whole window with the step's
position; here each stored query is turned from its own position to the current one). Each
query's softmax attention over the context is maxed over heads, and the window's queries are
summed. The tokens whose own query is still in the window (the prompt's last
``window_size - step`` tokens at decode step ``step``) are left out of that scoring and always
selected. Lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnikv_runtime.config.sections import MAX_WINDOW
from omnikv_runtime.policies.base import ScoredPolicy, SelectionContext, seed_window_scores
from omnikv_runtime.policies.params import bounded
from omnikv_runtime.policies.registry import register_selection_policy


@register_selection_policy
@dataclass
class UniformWindowPolicy(ScoredPolicy):
    """Top-k tokens by the summed max-over-heads softmax attention of the last ``window_size`` queries."""

    name = "uniform"
    graph_safe = True
    tensor_parallel = True

    window_size: int = bounded(16, 1, MAX_WINDOW)  # recent queries scored

    def weights(self) -> torch.Tensor:
        """``[window_size]`` weight of each query of the window, oldest first."""
        return torch.ones(self.window_size)

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        return seed_window_scores(ctx, self.weights())

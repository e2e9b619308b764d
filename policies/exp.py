"""OmniKV ``exp``: softmax attention of a window of recent queries, weights halving with age.

From OmniKV (Hao et al., ICLR 2025), as its code computes it: like ``uniform`` (every query of the
window at the current step's position; per query, max over heads, then summed over the window; the
window's own prompt tokens always selected), but a query ``a`` steps older than the current one
weighs ``decay ** a`` (the original's 0.5 by default), so the current query dominates while recent
ones still vote. Lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnikv_runtime.policies.params import bounded
from omnikv_runtime.policies.registry import register_selection_policy
from omnikv_runtime.policies.uniform import UniformWindowPolicy


@register_selection_policy
@dataclass
class ExpWindowPolicy(UniformWindowPolicy):
    """Top-k tokens by exponentially weighted softmax attention of recent queries (``uniform`` with weights
    that halve, by default, with each step of age)."""

    name = "exp"

    decay: float = bounded(0.5, 0.0, 1.0)  # weight of a query one step older than the next, in (0, 1]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.decay <= 0.0:
            raise ValueError(f"decay must lie in (0, 1], got {self.decay}")

    def weights(self) -> torch.Tensor:
        ages = torch.arange(self.window_size - 1, -1, -1, dtype=torch.float32)  # oldest first
        return self.decay**ages

"""``full``: every context token, whatever the budget (the dense reference).

A baseline for equal-terms comparisons (OmniKV, Hao et al., ICLR 2025, compares against full
attention): sparse layers see the whole context, so outputs equal dense. Lossless.
"""

from __future__ import annotations

import torch

from omnikv_runtime.policies.base import SelectionContext, SelectionPolicy, all_indices


class FullContextPolicy(SelectionPolicy):
    """Selects all context tokens; the budget is ignored."""

    name = "full"
    graph_safe = True

    def __init__(self, window_size: int = 1) -> None:
        super().__init__(window_size=1)

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        return all_indices(ctx.keys.shape[0], ctx.context_len, ctx.keys.device)

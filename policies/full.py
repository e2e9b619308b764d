"""``full``: every context token, whatever the budget (the dense reference).

A baseline for equal-terms comparisons (OmniKV, Hao et al., ICLR 2025, compares against full
attention): sparse layers see the whole context, so outputs equal dense. Lossless.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnikv_runtime.policies.base import SelectionContext, SelectionPolicy, all_indices
from omnikv_runtime.policies.registry import register_selection_policy


@register_selection_policy
@dataclass
class FullContextPolicy(SelectionPolicy):
    """Selects all context tokens; the budget is ignored."""

    name = "full"
    graph_safe = True
    tensor_parallel = True

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        return all_indices(ctx.keys.shape[0], ctx.context_len, ctx.keys.device)

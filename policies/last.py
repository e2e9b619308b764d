"""OmniKV ``last``: the last query's attention logits, max over heads.

From OmniKV (Hao et al., "OmniKV: Dynamic Context Selection for Efficient Long-Context LLMs",
ICLR 2025): a filter layer ranks every context token by the largest raw q·k logit any head of
the current query gives it, and the following sparse layers attend to the top-k tokens. Lossless:
the full KV is kept; selection only decides what is read this step.
"""

from __future__ import annotations

import torch

from omnikv_runtime.policies.base import SelectionContext, SelectionPolicy, head_logits


class LastQueryPolicy(SelectionPolicy):
    """Top-k tokens by max-over-heads logit of the current query (the seed's default)."""

    name = "last"

    def __init__(self, window_size: int = 1) -> None:
        super().__init__(window_size=1)

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        return head_logits(ctx, last_only=True)[:, :, 0].amax(dim=1)

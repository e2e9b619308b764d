"""StreamingLLM: attention sinks plus a window of recent tokens.

From Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024): the
first few tokens draw a large share of attention whatever their content ("attention sinks"), so a
cache of those sinks plus the most recent tokens keeps a model stable on endless streams. Here the
budget is ``sink_tokens`` sinks (the first real tokens of each row) and the latest context tokens
for the rest. Lossy: every other context token is dropped for good at the first decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from omnikv_runtime.config.sections import MAX_TOKENS
from omnikv_runtime.policies.base import SelectionContext, causal_columns, first_valid
from omnikv_runtime.policies.lossy import LayerState, LossyPolicy
from omnikv_runtime.policies.params import bounded
from omnikv_runtime.policies.registry import register_selection_policy


@register_selection_policy
@dataclass
class StreamingLLMPolicy(LossyPolicy):
    """``sink_tokens`` attention sinks plus the most recent context tokens, query-independent."""

    name = "streaming_llm"

    sink_tokens: int = bounded(4, 0, MAX_TOKENS)  # first real tokens of each row always kept

    def rank(self, ctx: SelectionContext, state: LayerState) -> torch.Tensor:
        length = ctx.context_len
        position = torch.arange(length, device=ctx.keys.device, dtype=torch.float32)
        scores = position.masked_fill(~causal_columns(ctx), -1.0).expand(ctx.keys.shape[0], length)
        return scores + 2 * length * first_valid(ctx.valid, self.sink_tokens)

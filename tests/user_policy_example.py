"""User selection policies loaded by ``"user_policy_example:ClassName"`` (tests/ is on sys.path under pytest)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omnikv_runtime.config import MAX_TOKENS
from omnikv_runtime.policies import LossyPolicy, ScoredPolicy, SelectionContext, SelectionPolicy, bounded, head_logits
from omnikv_runtime.policies.base import last_valid


@dataclass
class FirstTokensPolicy(ScoredPolicy):
    """Keeps the first `budget` real tokens of each row; counts its calls."""

    name = "first_tokens"
    calls: int = field(default=0, init=False)

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        self.calls += 1
        earliest_first = -torch.arange(ctx.context_len, dtype=torch.float32, device=ctx.keys.device)
        return earliest_first.expand(ctx.keys.shape[0], ctx.context_len)


@dataclass
class VaryingCountPolicy(SelectionPolicy):
    """Top tokens by key norm, `budget` of them on even decode positions and `budget - 3` on odd ones.

    Changing the count between steps makes the sparse layers move their tail in the working buffer.
    """

    name = "varying_count"

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        position = int(ctx.query_positions[-1])
        count = ctx.token_budget if position % 2 == 0 else max(ctx.token_budget - 3, 1)
        scores = ctx.keys.float().norm(dim=-1).amax(dim=1).masked_fill(~ctx.valid, float("-inf"))
        indices = torch.topk(scores, count, dim=-1).indices
        return torch.sort(indices, dim=-1).values


class NotAPolicy:
    """Has a select method but is no SelectionPolicy."""

    def select(self, ctx):  # pragma: no cover - must never be called
        raise AssertionError("NotAPolicy must be rejected at config time")


# --- the worked example of docs/policies.md (the docs test checks the two stay identical) ---


@dataclass
class RecentBoostPolicy(ScoredPolicy):
    """OmniKV's ``last`` scoring, but the `recent` latest context tokens are always kept.

    Lossless (the default): it only chooses what sparse layers read this step.
    """

    name = "recent_boost"
    recent: int = bounded(8, 0, MAX_TOKENS)  # latest context tokens always kept

    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        # [batch, q_heads, 1, context] logits of the current query; a token's score is its best head's
        logits = head_logits(ctx, last_only=True)[:, :, 0].amax(dim=1)
        # the latest `recent` real tokens outrank every other token
        boost = last_valid(ctx, min(self.recent, ctx.token_budget)) * (logits.abs().amax() * 2 + 1)
        return logits + boost


# --- classes the registry must reject ---


class HollowPolicy(SelectionPolicy):
    """Subclasses the interface but does not implement select."""

    name = "hollow"


class HollowScoredPolicy(ScoredPolicy):
    """A scored policy without scores."""

    name = "hollow_scored"


class HollowLossyPolicy(LossyPolicy):
    """A lossy policy without rank."""

    name = "hollow_lossy"


class KeywordsPolicy(ScoredPolicy):
    """Takes any keyword argument: it could not say which it uses."""

    name = "keywords"

    def __init__(self, **options) -> None:
        self.options = options

    def scores(self, ctx: SelectionContext) -> torch.Tensor:  # pragma: no cover - must never be called
        raise AssertionError("KeywordsPolicy must be rejected at config time")

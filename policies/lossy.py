"""Shared machinery of the lossy baselines (StreamingLLM, H2O, SnapKV): tokens dropped for good.

A lossy method shrinks the KV cache itself, so a token it evicts can never be attended again. In
this runtime the full KV stays in the host tier (so every method runs on equal terms: same layer
plan, same budget, only the selector differs), and the lossy behaviour is enforced here instead:
per filter layer and request, a mask of the context tokens still alive; a token the policy does
not select is dropped from it and never selected again. Tokens generated after the prompt are the
runtime's tail, which every policy keeps.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch

from omnikv_runtime.policies.base import SelectionContext, SelectionPolicy, all_indices

_STATE_KEY = "lossy"  # where a filter layer's LayerState lives in ctx.state
# Alive tokens score at least KEEP_FLOOR; padding fills a row before a dropped token would.
KEEP_FLOOR = -1e30
_PAD_SCORE = -1e38


@dataclass
class LayerState:
    """One filter layer's state for the current request."""

    alive: torch.Tensor  # [batch, context_len] bool, False once a valid token is dropped
    valid: torch.Tensor  # [batch, context_len] bool, as last seen
    first: bool = True  # no selection made yet this request
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the policy's own running state


@dataclass
class LossyPolicy(SelectionPolicy):
    """Base of the lossy policies: subclasses implement :meth:`rank` (higher = keep).

    State is per filter layer and per request, in ``ctx.state`` (owned by the cache); a context
    that shrinks or a batch that changes size starts afresh, a context that grows (a new turn's
    prefill) adds live tokens.
    """

    lossless = False

    @abstractmethod
    def rank(self, ctx: SelectionContext, state: LayerState) -> torch.Tensor:
        """``[batch, context_len]`` scores of the context tokens; only the alive ones count."""

    def dropped_tokens(self, states: dict[int, dict[str, Any]]) -> dict[int, int]:
        dropped = {}
        for layer, layer_state in sorted(states.items()):
            state = layer_state.get(_STATE_KEY)
            if state is not None:
                dropped[layer] = int((state.valid & ~state.alive).sum(-1).max()) if state.alive.numel() else 0
        return dropped

    def _state(self, ctx: SelectionContext) -> LayerState:
        batch, length = ctx.valid.shape
        state = ctx.state.get(_STATE_KEY)
        if state is not None and (state.alive.shape[0] != batch or state.alive.shape[1] > length):
            state = None
        if state is None:
            alive = torch.ones(batch, length, dtype=torch.bool, device=ctx.valid.device)
            state = ctx.state[_STATE_KEY] = LayerState(alive, ctx.valid)
        elif state.alive.shape[1] < length:
            grown = torch.ones(batch, length - state.alive.shape[1], dtype=torch.bool, device=ctx.valid.device)
            state.alive = torch.cat([state.alive, grown], dim=1)
        state.valid = ctx.valid
        return state

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        state = self._state(ctx)
        batch = ctx.keys.shape[0]
        if ctx.token_budget >= ctx.context_len:  # nothing needs dropping
            state.first = False
            return all_indices(batch, ctx.context_len, ctx.keys.device)
        scores = self.rank(ctx, state).float().nan_to_num(0.0).clamp(min=KEEP_FLOOR)
        state.first = False
        keep = state.alive & ctx.valid
        filler = torch.full_like(scores, float("-inf")).masked_fill(~ctx.valid, _PAD_SCORE)
        scores = torch.where(keep, scores, filler)
        indices = torch.sort(torch.topk(scores, ctx.token_budget, dim=-1, sorted=False).indices, dim=-1).values
        chosen = torch.zeros_like(state.alive).scatter_(1, indices, True)
        state.alive = state.alive & (chosen | ~ctx.valid)
        return indices


def window_attention(ctx: SelectionContext, keep: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """Softmax attention over the `keep` columns, summed over the query window: ``[batch, q_heads, context_len]``.

    Causal like :func:`head_logits`; computed one query head at a time so a long window of prompt
    queries needs only ``batch * window * context_len`` floats at once. A query that sees no kept
    column adds nothing.
    """
    queries = ctx.queries[:, :, -1:] if last_only else ctx.queries
    positions = ctx.query_positions[-1:] if last_only else ctx.query_positions
    q_heads = queries.shape[1]
    group = q_heads // ctx.keys.shape[1]
    columns = torch.arange(ctx.context_len, device=ctx.keys.device)
    hidden = (columns[None, :] > positions.to(columns.device)[:, None])[None] | ~keep[:, None, :]
    out = []
    for head in range(q_heads):
        logits = torch.einsum("bwd,btd->bwt", queries[:, head].float(), ctx.keys[:, head // group].float())
        logits = (logits * ctx.scaling).masked_fill(hidden, float("-inf"))
        out.append(torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(dim=1))
    return torch.stack(out, dim=1)

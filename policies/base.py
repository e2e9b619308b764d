"""The selection-policy interface: which context tokens a sparse layer attends to.

A filter layer hands its policy a :class:`SelectionContext` (tensors only: recent queries after
RoPE, the context keys, which positions are real tokens, the budget, the model's rotary
frequencies) and gets back sorted token indices ``[batch, k]`` on the same device. A policy never
sees the cache.
"""

from __future__ import annotations

import dataclasses
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from omnikv_runtime.kernels.layer_ops import rotate_half
from omnikv_runtime.policies.params import check_fields

logger = logging.getLogger(__name__)


@dataclass
class SelectionContext:
    """What a filter layer knows when it selects.

    Attributes:
        queries: ``[batch, q_heads, window, head_dim]``, the most recent queries of this layer
            (after RoPE), oldest first; the last one is the current step's.
        query_positions: ``[window]`` cache column of each query (for causality).
        keys: ``[batch, kv_heads, context_len, head_dim]``, keys of the selectable context.
        valid: ``[batch, context_len]`` bool, False at padded positions.
        token_budget: how many tokens to select (``0 <= token_budget <= context_len``): the config's
            ``omnikv.token_budget`` for this context.
        scaling: the attention's softmax scale.
        layer: index of the filter layer selecting.
        state: this filter layer's per-request state, owned by the cache (a fresh cache, a fresh
            dict): a stateful policy keeps what it carries from step to step here, never on itself,
            so one policy object serves any number of requests.
        head_group: with tensor parallelism, the process group whose ranks hold the other heads
            (None otherwise). A policy whose scores are a maximum over heads passes that maximum
            through :meth:`max_over_ranks` so that every rank selects the same tokens.
        rope_inv_freq: ``[rotary_dim // 2]`` float32, the model's rotary inverse frequencies (on the
            queries' device), or None where the cache was not told them. Each query in ``queries``
            was rotated at its own position; with these a policy can turn it to another position
            (:func:`queries_at_current_position`), as the original OmniKV's window selectors score
            every query of their window at the current step's position.
        head_max_logits: ``[batch, context_len]`` float32 or None: for the current query, ``scaling`` times the
            largest ``q·k`` of this rank's query heads for each column, ``-inf`` where the decode attention did
            not count the column (padding, past the query's position). Written by the filter layer's decode
            attention while it read the keys, for a policy that says it reads them
            (``reads_head_max_logits``) on CUDA; None elsewhere (prefill, the CPU), where the policy computes
            what it needs from ``keys``.
    """

    queries: torch.Tensor
    query_positions: torch.Tensor
    keys: torch.Tensor
    valid: torch.Tensor
    token_budget: int
    scaling: float
    layer: int = 0
    state: dict[str, Any] = field(default_factory=dict)
    head_group: Any = None
    rope_inv_freq: torch.Tensor | None = None
    head_max_logits: torch.Tensor | None = None

    @property
    def context_len(self) -> int:
        return self.keys.shape[-2]

    def max_over_ranks(self, scores: torch.Tensor) -> torch.Tensor:
        """A maximum over this rank's heads, turned into the maximum over every rank's heads (in place)."""
        if self.head_group is not None:
            dist.all_reduce(scores, op=dist.ReduceOp.MAX, group=self.head_group)
        return scores


@dataclass
class SelectionPolicy(ABC):
    """Base class: which context tokens a filter layer's sparse layers read this step.

    A policy is a dataclass whose fields are its parameters (a config's ``omnikv.selector`` keys
    other than ``type``); :func:`~omnikv_runtime.policies.params.bounded` declares the values a
    config may give. An argument the policy does not declare is refused, so every field must
    change what the policy does.

    Subclasses implement :meth:`select`, or subclass :class:`ScoredPolicy` and implement
    ``scores``. ``window_size`` is how many recent queries the policy reads from ``ctx.queries``:
    1 unless the policy declares a ``window_size`` field. ``lossless`` is True for policies that
    never drop KV for good (all OmniKV policies); lossy ones report what they dropped in
    :meth:`dropped_tokens`. Per-request state goes in ``ctx.state``, never on the policy.

    ``tensor_parallel`` says that the policy's choice depends on the heads only through a maximum
    over heads that it passes through :meth:`SelectionContext.max_over_ranks` (or not at all), so
    ranks that each hold some of the heads select the same tokens; other policies are refused when
    ``distributed.tp_size`` is above 1.

    ``graph_safe`` says that :meth:`select` may be captured in a CUDA graph and replayed: it reads
    no value back to the host, allocates nothing it keeps across steps, and keeps no state outside
    tensors it updates in place. Policies that are not (and user policies, unless they say so)
    decode step by step without a graph.

    ``reads_head_max_logits`` says that the policy scores by the current query's largest logit over heads
    and reads :attr:`SelectionContext.head_max_logits` where it is given: the filter layer's decode
    attention then writes those scores as it reads the keys, saving the policy a second pass over them.
    """

    name: ClassVar[str] = "base"
    lossless: ClassVar[bool] = True
    graph_safe: ClassVar[bool] = False
    tensor_parallel: ClassVar[bool] = False
    reads_head_max_logits: ClassVar[bool] = False

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def window_size(self) -> int:
        """Recent queries the policy reads (a policy with a ``window_size`` field overrides this)."""
        return 1

    @abstractmethod
    def select(self, ctx: SelectionContext) -> torch.Tensor:
        """Sorted indices ``[batch, k]`` (``k <= ctx.token_budget``) of the tokens to read; padded tokens
        last, if at all."""

    def dropped_tokens(self, states: dict[int, dict[str, Any]]) -> dict[int, int]:
        """Filter layer -> context tokens dropped for good this request (max over batch rows), from each
        filter layer's ``ctx.state``; {} if lossless."""
        return {}


@dataclass
class ScoredPolicy(SelectionPolicy):
    """A policy that scores every context token and keeps the top ``token_budget`` valid ones."""

    @abstractmethod
    def scores(self, ctx: SelectionContext) -> torch.Tensor:
        """``[batch, context_len]`` importance of each token (any real dtype; higher = keep)."""

    def select(self, ctx: SelectionContext) -> torch.Tensor:
        batch = ctx.keys.shape[0]
        if ctx.token_budget >= ctx.context_len:
            return all_indices(batch, ctx.context_len, ctx.keys.device)
        scores = self.scores(ctx).float().masked_fill(~ctx.valid, float("-inf"))
        indices = torch.topk(scores, ctx.token_budget, dim=-1, sorted=False).indices
        return torch.sort(indices, dim=-1).values


def all_indices(batch: int, length: int, device: torch.device) -> torch.Tensor:
    """Every position ``0..length-1`` for each row of the batch."""
    return torch.arange(length, device=device).expand(batch, length)


def head_logits(ctx: SelectionContext, last_only: bool = False) -> torch.Tensor:
    """Scaled q·k logits per query head: ``[batch, q_heads, window, context_len]`` (float32).

    Query head ``h`` is scored against KV head ``h // (q_heads // kv_heads)``, as ``repeat_kv``
    lays heads out. Positions a query cannot see causally are ``-inf``.
    """
    queries = ctx.queries[:, :, -1:] if last_only else ctx.queries
    positions = ctx.query_positions[-1:] if last_only else ctx.query_positions
    batch, q_heads, window, dim = queries.shape
    kv_heads = ctx.keys.shape[1]
    # half-precision keys stay in their dtype (the matmul accumulates in float32): converting a long
    # context's keys to float32 would cost more memory traffic than the attention itself
    compute_dtype = ctx.keys.dtype if ctx.keys.dtype in (torch.float16, torch.bfloat16) else torch.float32
    grouped = queries.to(compute_dtype).reshape(batch, kv_heads, q_heads // kv_heads, window, dim)
    logits = torch.einsum("bhgwd,bhtd->bhgwt", grouped, ctx.keys.to(compute_dtype)).float() * ctx.scaling
    logits = logits.reshape(batch, q_heads, window, ctx.context_len)
    columns = torch.arange(ctx.context_len, device=logits.device)
    future = columns[None, :] > positions.to(logits.device)[:, None]  # [window, context_len]
    return logits.masked_fill(future, float("-inf"))


def windowed_softmax_scores(ctx: SelectionContext, weights: torch.Tensor) -> torch.Tensor:
    """Max over heads of the weighted mean (over the query window) of per-head softmax attention.

    ``weights`` is ``[window]`` (oldest first) and is renormalised over the queries present.
    """
    logits = head_logits(ctx)
    logits = logits.masked_fill(~ctx.valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a query seeing nothing scores 0
    window = logits.shape[2]
    weights = weights[-window:].to(probs)
    weights = weights / weights.sum()
    return ctx.max_over_ranks(torch.einsum("bhwt,w->bht", probs, weights).amax(dim=1))


def window_columns(ctx: SelectionContext) -> torch.Tensor:
    """``[batch, context_len]`` bool: valid context columns whose own query is in ``ctx.queries``
    (at the first decode steps, the prompt's last tokens; empty slots, at position -1, mark none)."""
    length = ctx.context_len
    positions = ctx.query_positions.to(ctx.keys.device)
    inside = (positions >= 0) & (positions < length)
    marks = torch.zeros(length + 1, dtype=torch.bool, device=ctx.keys.device)
    marks[torch.where(inside, positions, length)] = True  # out-of-context queries mark the spare slot
    return ctx.valid & marks[:length][None, :]


_UNROTATED_LOGGED = False


def queries_at_current_position(ctx: SelectionContext) -> torch.Tensor:
    """``ctx.queries`` as if every one had been rotated at the current (last) query's position.

    RoPE rotates each pair of a query's dimensions by ``position * inv_freq``; rotations compose, so
    turning a query rotated at its own position ``p`` by ``(current - p) * inv_freq`` gives the query
    rotated at ``current``: what rotating the un-rotated query there gives, up to rounding. Pairs are laid
    out as transformers lays them (first half with second half); dimensions past ``2 * len(inv_freq)``
    (partial rotary) are left as they are. No attention factor is applied: the stored queries carry the
    model's already. Returns float32. Without ``ctx.rope_inv_freq`` the queries are returned as they
    are (each at its own position), with one log line per process.
    """
    global _UNROTATED_LOGGED
    if ctx.rope_inv_freq is None:
        if not _UNROTATED_LOGGED and ctx.queries.shape[2] > 1:
            _UNROTATED_LOGGED = True
            logger.info(
                "the selection context has no rotary frequencies (rope_inv_freq): the window's queries are "
                "scored at their own positions, not at the current step's as the original OmniKV scores them"
            )
        return ctx.queries
    queries = ctx.queries.float()
    positions = ctx.query_positions.to(queries.device)
    distance = (positions[-1] - positions).float()  # [window]
    angles = distance[:, None] * ctx.rope_inv_freq.to(queries.device, torch.float32)[None, :]
    angles = torch.cat((angles, angles), dim=-1)  # [window, rotary_dim]
    rotary = angles.shape[-1]
    turned = queries[..., :rotary] * angles.cos() + rotate_half(queries[..., :rotary]) * angles.sin()
    return torch.cat((turned, queries[..., rotary:]), dim=-1) if rotary < queries.shape[-1] else turned


def seed_window_scores(ctx: SelectionContext, weights: torch.Tensor) -> torch.Tensor:
    """The original OmniKV's window scoring (its ``uniform`` and ``exp`` selectors).

    Every query of the window is scored at the current step's position, as the original rotates them
    (:func:`queries_at_current_position`). Tokens whose own query is in the window are left out of the
    scoring (each query's softmax runs over the other valid tokens it sees) and score above every other
    token, later ones higher, so they are always selected when the budget holds them. The others score
    ``sum_w weights[w] * max_h softmax_h(q_w . k)``: the max over heads is taken per query, then the
    window's queries are summed. ``weights`` is ``[window]``, oldest first.
    """
    ctx = dataclasses.replace(ctx, queries=queries_at_current_position(ctx))
    forced = window_columns(ctx)
    logits = head_logits(ctx).masked_fill(~(ctx.valid & ~forced)[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a query seeing nothing scores 0
    per_query = ctx.max_over_ranks(probs.amax(dim=1))  # [batch, window, context_len]: max over heads first
    weights = weights[-per_query.shape[1] :].to(per_query)
    scores = torch.einsum("bwt,w->bt", per_query, weights)
    columns = torch.arange(ctx.context_len, device=scores.device, dtype=scores.dtype)
    above = weights.sum() + 1.0 + columns / max(ctx.context_len, 1)  # above any sum of probabilities
    return torch.where(forced, above[None, :], scores)


def first_valid(valid: torch.Tensor, count: int) -> torch.Tensor:
    """``[batch, context_len]`` bool: the first `count` valid positions of each row (attention sinks)."""
    return valid & (valid.long().cumsum(-1) <= count)


def causal_columns(ctx: SelectionContext) -> torch.Tensor:
    """``[context_len]`` bool: the columns the current (last) query may see."""
    columns = torch.arange(ctx.context_len, device=ctx.keys.device)
    return columns <= ctx.query_positions[-1].to(columns.device)


def last_valid(ctx: SelectionContext, count: int) -> torch.Tensor:
    """``[batch, context_len]`` bool: the `count` most recent valid positions the current query sees."""
    seen = ctx.valid & causal_columns(ctx)[None, :]
    from_the_end = seen.long().flip(-1).cumsum(-1).flip(-1)  # valid positions at or after each column
    return seen & (from_the_end <= count)


def ranked_groups(group_scores: torch.Tensor, group_size: int, context_len: int) -> torch.Tensor:
    """Token scores that pick whole groups (pages, blocks) best group first.

    ``group_scores`` is ``[batch, groups]`` (``-inf`` for an empty group); token ``t`` belongs to group
    ``t // group_size``. A token's score is its group's rank (best group highest) times
    ``group_size`` plus its offset in the group, so a top-k takes whole groups in order and, in the
    last one taken, its latest tokens. Exact integers in float32 up to 16M tokens; ties broken by
    group index (stable sort), so the result is deterministic.
    """
    batch, groups = group_scores.shape
    order = torch.sort(group_scores.float(), dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(groups, device=order.device).expand(batch, groups))
    positions = torch.arange(context_len, device=group_scores.device)
    token_rank = rank[:, positions // group_size]  # [batch, context_len]
    return ((groups - token_rank) * group_size + positions % group_size).float()

"""Selection policies on synthetic SelectionContexts, and user policies loaded by "module:Class"."""

from __future__ import annotations

import pytest
import torch
import user_policy_example
from okv_testlib import PAD, PROMPT_LEN, capture_caches, make_model, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime.policies import (
    SELECTION_POLICIES,
    SelectionContext,
    head_logits,
    make_selection_policy,
)

BUILTIN = ("last", "softmax_last", "uniform", "exp", "full", "streaming_llm", "h2o", "snapkv", "quest", "infllm")
SCORING = tuple(name for name in sorted(SELECTION_POLICIES) if name != "full")
QUERY_AWARE = tuple(name for name in SCORING if name != "streaming_llm")  # StreamingLLM ignores the data
OMNIKV = ("last", "softmax_last", "uniform", "exp")  # token-level query scoring: budget 1 picks the best token


def random_context(
    seed: int,
    batch: int = 2,
    q_heads: int = 4,
    kv_heads: int = 2,
    dim: int = 8,
    context_len: int = 40,
    window: int = 16,
    budget: int = 8,
    pad: int = 10,
) -> SelectionContext:
    """A decode-like context: the last query is the current token (position context_len), older ones lie inside."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.ones(batch, context_len, dtype=torch.bool)
    if batch > 1:
        valid[1, :pad] = False
    return SelectionContext(
        queries=torch.randn(batch, q_heads, window, dim, generator=g),
        query_positions=torch.arange(context_len - window + 1, context_len + 1),
        keys=torch.randn(batch, kv_heads, context_len, dim, generator=g),
        valid=valid,
        token_budget=budget,
        scaling=dim**-0.5,
    )


@pytest.mark.parametrize("name", sorted(SELECTION_POLICIES))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("q_heads", "kv_heads"), [(4, 2), (4, 4), (4, 1)])
def test_policy_contract_on_random_contexts(name, seed, q_heads, kv_heads):
    policy = make_selection_policy({"type": name})
    ctx = random_context(seed, q_heads=q_heads, kv_heads=kv_heads, window=policy.window_size)
    before = [t.clone() for t in (ctx.queries, ctx.query_positions, ctx.keys, ctx.valid)]
    indices = policy.select(ctx)
    for original, now in zip(before, (ctx.queries, ctx.query_positions, ctx.keys, ctx.valid)):
        assert torch.equal(original, now)  # the context is not modified
    assert indices.dtype == torch.long and indices.device == ctx.keys.device
    if name == "full":
        assert torch.equal(indices, torch.arange(ctx.context_len).expand(2, -1))
        return
    assert indices.shape == (2, ctx.token_budget)
    assert (indices[:, 1:] > indices[:, :-1]).all()  # sorted, no repeats
    assert indices.min() >= 0 and indices.max() < ctx.context_len
    assert ctx.valid.gather(1, indices).all()  # 30 valid tokens in row 1 > budget: no padding picked
    assert torch.equal(policy.select(ctx), indices)  # deterministic
    assert torch.equal(make_selection_policy({"type": name}).select(ctx), indices)


@pytest.mark.parametrize("name", SCORING)
def test_policy_keeps_every_valid_token_when_the_budget_exceeds_them(name):
    policy = make_selection_policy({"type": name})
    ctx = random_context(3, window=policy.window_size, budget=8, pad=35)  # row 1: 5 valid tokens
    indices = policy.select(ctx)
    assert indices.shape == (2, 8)
    assert set(range(35, 40)) <= set(indices[1].tolist())


@pytest.mark.parametrize("name", sorted(SELECTION_POLICIES))
def test_budget_at_least_the_context_selects_everything(name):
    policy = make_selection_policy({"type": name})
    ctx = random_context(4, window=policy.window_size, budget=40)
    assert torch.equal(policy.select(ctx), torch.arange(40).expand(2, -1))


def test_policies_rank_tokens_differently_on_random_data():
    """Control: the contract test is not passed by returning the same positions whatever the data (the budget
    exceeds the 15 window tokens `uniform` and `exp` always keep)."""
    ctx_a, ctx_b = random_context(0, window=16, budget=24), random_context(1, window=16, budget=24)
    for name in QUERY_AWARE:
        select_a = make_selection_policy({"type": name}).select(ctx_a)
        assert not torch.equal(select_a, make_selection_policy({"type": name}).select(ctx_b)), name


# GQA: query head h reads KV head h // (q_heads // kv_heads) -------------------------------------------


def gqa_context(head: int, window: int) -> tuple[SelectionContext, torch.Tensor, torch.Tensor]:
    """Query head `head` aligns with token `target` in its own KV head and with a stronger `decoy` in the other."""
    g = torch.Generator().manual_seed(5)
    batch, q_heads, kv_heads, dim, length = 2, 4, 2, 8, 40
    right_kv = head // (q_heads // kv_heads)
    wrong_kv = 1 - right_kv
    u = torch.randn(dim, generator=g)
    u = 4 * u / u.norm()
    queries = 0.01 * torch.randn(batch, q_heads, window, dim, generator=g)
    queries[:, head] = u
    keys = 0.1 * torch.randn(batch, kv_heads, length, dim, generator=g)
    target, decoy = torch.tensor([5, 17]), torch.tensor([23, 31])
    for row in range(batch):
        keys[row, right_kv, target[row]] = 3 * u
        keys[row, wrong_kv, decoy[row]] = 6 * u
    ctx = SelectionContext(
        queries=queries,
        query_positions=torch.arange(length, length + window),  # decode steps: no window query inside the context
        keys=keys,
        valid=torch.ones(batch, length, dtype=torch.bool),
        token_budget=1,
        scaling=dim**-0.5,
    )
    return ctx, target, decoy


@pytest.mark.parametrize("head", [0, 1, 2, 3])
@pytest.mark.parametrize("name", OMNIKV)
def test_gqa_query_head_reads_its_own_kv_head(name, head):
    policy = make_selection_policy({"type": name})
    ctx, target, decoy = gqa_context(head, policy.window_size)
    # self-check of the data: read through the other KV head, the query would pick the decoy
    other = 1 - head // 2
    wrong_logits = torch.einsum("bd,btd->bt", ctx.queries[:, head, -1], ctx.keys[:, other])
    assert torch.equal(wrong_logits.argmax(-1), decoy)
    assert torch.equal(policy.select(ctx)[:, 0], target)


def test_head_logits_use_the_repeat_kv_head_layout():
    ctx = random_context(6, window=3)
    logits = head_logits(ctx)
    for h in range(4):
        expected = torch.einsum("bwd,btd->bwt", ctx.queries[:, h], ctx.keys[:, h // 2]) * ctx.scaling
        torch.testing.assert_close(logits[:, h, :, :-1], expected[:, :, :-1], rtol=1e-5, atol=1e-5)


# causality of the query window -------------------------------------------------------------------------


def causal_context(window: int = 8) -> SelectionContext:
    """Queries at positions 12..19 of a 30-token context; tokens 20..29 (their future) align strongly with them."""
    g = torch.Generator().manual_seed(7)
    batch, q_heads, kv_heads, dim, length = 2, 4, 2, 8, 30
    u = torch.randn(dim, generator=g)
    u = 3 * u / u.norm()
    queries = u + 0.1 * torch.randn(batch, q_heads, window, dim, generator=g)
    keys = 0.5 * torch.randn(batch, kv_heads, length, dim, generator=g)
    keys[:, :, 20:] = 4 * u
    return SelectionContext(
        queries=queries,
        query_positions=torch.arange(20 - window, 20),
        keys=keys,
        valid=torch.ones(batch, length, dtype=torch.bool),
        token_budget=5,
        scaling=dim**-0.5,
    )


def test_head_logits_hide_each_querys_future():
    ctx = causal_context()
    logits = head_logits(ctx)
    future = torch.arange(30)[None, :] > ctx.query_positions[:, None]  # [window, context]
    assert torch.isneginf(logits[:, :, future]).all()
    assert torch.isfinite(logits[:, :, ~future]).all()
    last = head_logits(ctx, last_only=True)
    assert last.shape == (2, 4, 1, 30)
    assert torch.isneginf(last[..., 20:]).all() and torch.isfinite(last[..., :20]).all()


@pytest.mark.parametrize("name", SCORING)
def test_no_query_selects_its_future(name):
    policy = make_selection_policy({"type": name, "window_size": 8} if name in ("uniform", "exp") else {"type": name})
    ctx = causal_context(window=policy.window_size)
    # self-check: ignoring causality, the aligned future tokens would win
    raw = torch.einsum("bhwd,btd->bt", ctx.queries[:, :2], ctx.keys[:, 0])
    assert (raw.topk(5).indices >= 20).all()
    assert (policy.select(ctx) < 20).all()


def test_exp_weighs_the_newest_query_most():
    g = torch.Generator().manual_seed(8)
    dim, length = 8, 20
    a, b = torch.zeros(dim), torch.zeros(dim)
    a[0], b[1] = 6.0, 6.0
    queries = 0.01 * torch.randn(1, 2, 2, dim, generator=g)
    queries[:, :, 0], queries[:, :, 1] = a, b  # oldest first: the older query looks for a, the newest for b
    keys = 0.05 * torch.randn(1, 1, length, dim, generator=g)
    keys[0, 0, 4], keys[0, 0, 11] = a, b
    ctx = SelectionContext(queries, torch.tensor([length, length + 1]), keys, torch.ones(1, length, dtype=bool), 1, 1.0)
    assert make_selection_policy({"type": "exp", "window_size": 2}).select(ctx).tolist() == [[11]]


# user policies -----------------------------------------------------------------------------------------


def test_user_policy_by_module_and_class_name():
    model = make_model("llama")
    ids, mask = make_prompt(2)
    selector = {"type": "user_policy_example:FirstTokensPolicy"}
    engine = okv.initialize(model, omni(budget=8, selector=selector), trust_remote_code=True)
    assert type(engine.policy) is user_policy_example.FirstTokensPolicy
    caches = capture_caches(engine)
    new_tokens = 6
    engine.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=PAD)
    (cache,) = caches
    assert cache.selector.policy is engine.policy
    assert engine.policy.calls == 2 * (new_tokens - 1)  # two filter layers per decode step
    first_real = int((mask[1] == 0).sum())
    expected = torch.stack([torch.arange(8), torch.arange(first_real, first_real + 8)])
    for segment in engine.plan.segments:
        assert torch.equal(cache.tiers.segments[segment.index].selection, expected)
    assert cache.context_len == PROMPT_LEN

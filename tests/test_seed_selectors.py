"""`uniform` and `exp` select what the original OmniKV's code selects, and `softmax_before_last` is `softmax_last`.

The reference below is the original's selection for these selectors, restated for one batch row:
at decode step `step` (1 = the first token after the prompt) its filter layer keeps the last
`window` queries, of which `window - step` are the prompt's last tokens. Those tokens go into the
selection unscored; the rest of the prompt is scored per query by softmax attention over it,
max over heads, then summed over the window's queries (`exp`: each older query halves).
"""

from __future__ import annotations

import pytest
import torch
from okv_testlib import PROMPT_LEN, make_model, make_prompt, omni, record_selections

import omnikv_runtime as okv
from omnikv_runtime.policies import SELECTION_POLICIES, SelectionContext, make_selection_policy


def original_selection(queries, keys, prompt_len, step, window, budget, selector, scaling):
    """Sorted token indices the original picks for `queries` ``[1, heads, window, dim]`` over the prompt's keys."""
    in_window = max(0, window - step)
    consider = prompt_len - in_window
    group = queries.shape[1] // keys.shape[1]
    scored_keys = keys[:, :, :consider].repeat_interleave(group, dim=1).double()
    wanted = max(1, budget - in_window)
    total = None
    for query in queries.double().split(1, dim=2):
        score = torch.softmax(query @ scored_keys.transpose(2, 3) * scaling, dim=-1)
        score = score.max(dim=1).values.sum(dim=-2)  # max over heads, then the (single) query
        if total is None:
            total = score
        else:
            total = total + score if selector == "uniform" else total * 0.5 + score
    picked = total.topk(min(wanted, consider), dim=-1).indices
    tail = torch.arange(prompt_len - in_window, prompt_len)[None, :]
    return torch.sort(torch.cat([picked, tail], dim=1), dim=-1).values


def decode_context(seed, step, window, budget, prompt_len=48, heads=4, kv_heads=2, dim=8) -> SelectionContext:
    """The filter layer's view at decode step `step`: the last `window` queries, the prompt's keys."""
    g = torch.Generator().manual_seed(seed)
    return SelectionContext(
        queries=torch.randn(1, heads, window, dim, generator=g),
        query_positions=torch.arange(prompt_len + step - window, prompt_len + step),
        keys=torch.randn(1, kv_heads, prompt_len, dim, generator=g),
        valid=torch.ones(1, prompt_len, dtype=torch.bool),
        budget=budget,
        scaling=dim**-0.5,
    )


@pytest.mark.parametrize("selector", ["uniform", "exp"])
@pytest.mark.parametrize("window", [4, 16])
@pytest.mark.parametrize("budget", [17, 24])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_selectors_pick_what_the_original_picks(selector, window, budget, seed):
    policy = make_selection_policy({"type": selector, "window_size": window})
    for step in range(1, window + 3):  # the window's prompt tokens run out at step `window`
        ctx = decode_context(seed * 100 + step, step, window, budget)
        expected = original_selection(ctx.queries, ctx.keys, 48, step, window, budget, selector, ctx.scaling)
        chosen = policy.select(ctx)
        assert torch.equal(chosen, expected), (step, chosen, expected)
        if step < window:  # the prompt's last window - step tokens are in, whatever their scores
            assert set(range(48 - (window - step), 48)) <= set(chosen[0].tolist())


def test_the_max_over_heads_comes_before_the_sum_over_queries():
    """Tokens A, B and two fillers; keys are one-hot, so each query holds its logits. B takes half of head 0's
    attention in both queries; A takes 45% of head 0 in one query and 90% of head 1 in the other. Summed over
    queries first, head 0 makes B the best (1.0 against A's 0.95 in head 1); maxed over heads first, as the
    original does, A wins (0.45 + 0.9 against 0.5 + 0.5)."""
    probs = torch.tensor(
        [  # [head, query, token]: A, B, filler, filler
            [[0.45, 0.5, 0.025, 0.025], [0.05, 0.5, 0.225, 0.225]],
            [[0.05, 0.05, 0.45, 0.45], [0.9, 0.05, 0.025, 0.025]],
        ]
    )
    queries = probs.log()[None]  # [1, heads, window, 4]: softmax gives back `probs`
    keys = torch.eye(4).expand(1, 2, 4, 4)
    ctx = SelectionContext(queries, torch.tensor([4, 5]), keys, torch.ones(1, 4, dtype=torch.bool), 1, 1.0)
    summed_first = probs.sum(dim=1).amax(dim=0)  # the other order: B
    assert summed_first.argmax().item() == 1
    policy = make_selection_policy({"type": "uniform", "window_size": 2})
    assert policy.select(ctx).tolist() == original_selection(queries, keys, 4, 2, 2, 1, "uniform", 1.0).tolist()
    assert policy.select(ctx).tolist() == [[0]]
    exp = make_selection_policy({"type": "exp", "window_size": 2})
    assert exp.select(ctx).tolist() == original_selection(queries, keys, 4, 2, 2, 1, "exp", 1.0).tolist()


def test_a_budget_below_the_window_keeps_the_latest_window_tokens():
    """The original then selects window - step + 1 tokens, over the budget; here the budget is a hard cap."""
    ctx = decode_context(3, step=1, window=16, budget=5)
    chosen = make_selection_policy({"type": "uniform"}).select(ctx)
    assert chosen.tolist() == [[43, 44, 45, 46, 47]]


def test_the_engine_hands_the_window_the_original_keeps():
    """Through the engine: at decode step s the window holds the prompt's last window - s queries, then the
    generated ones, and the selection holds those prompt tokens (left-padded row 1 too)."""
    window, budget, steps = 6, 12, 9
    engine = okv.initialize(make_model("llama"), omni(budget=budget, selector={"type": "uniform", "window_size": 6}))
    log = record_selections(engine)
    ids, mask = make_prompt(2)
    engine.generate(ids, attention_mask=mask, max_new_tokens=steps)
    assert len(log) == 2 * (steps - 1)  # two filter layers per decode step
    for number, (positions, indices) in enumerate((e.context.query_positions, e.indices) for e in log):
        step = number // 2 + 1
        assert positions.tolist() == list(range(PROMPT_LEN + step - window, PROMPT_LEN + step))
        kept = set(range(PROMPT_LEN - max(0, window - step), PROMPT_LEN))
        for row in indices.tolist():
            assert kept <= set(row) and len(row) == budget


@pytest.mark.parametrize(
    "config",
    [
        {"do_select_layers": "1,4", "selector_cls": "softmax_before_last"},
        {"omnikv": {"filter_layers": [1, 4], "selector": "softmax_before_last"}},
    ],
)
def test_softmax_before_last_is_softmax_last(config):
    """The original's code default, by its own name, in both config formats."""
    engine = okv.initialize(make_model("llama"), config)
    assert type(engine.policy) is SELECTION_POLICIES["softmax_last"]
    ctx = decode_context(5, step=20, window=1, budget=7)
    assert torch.equal(engine.policy.select(ctx), make_selection_policy({"type": "softmax_last"}).select(ctx))

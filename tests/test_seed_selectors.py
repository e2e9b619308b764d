"""`uniform` and `exp` select what the original OmniKV's code selects, and `softmax_before_last` is `softmax_last`.

The reference below is the original's selection for these selectors, restated for one batch row:
at decode step `step` (1 = the first token after the prompt) its filter layer keeps the last
`window` queries, of which `window - step` are the prompt's last tokens, and rotates all of them
with the current step's position. The window's prompt tokens go into the selection unscored; the
rest of the prompt is scored per query by softmax attention over it, max over heads, then summed
over the window's queries (`exp`: each older query halves). The runtime receives each query rotated
at its own position, so the tests start from queries before RoPE: the policy sees them rotated at
their own positions, the reference rotates them at the current one. On the bundled model the
reference starts from the model's own projections (last test).
"""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
from okv_testlib import PROMPT_LEN, make_model, make_prompt, omni, record_selections
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import omnikv_runtime as okv
from omnikv_runtime.listeners import SelectionRecorder
from omnikv_runtime.policies import SELECTION_POLICIES, SelectionContext, make_selection_policy
from omnikv_runtime.policies.base import queries_at_current_position

DIM = 8
INV_FREQ = 1.0 / (10000 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))


def rope(x, positions, inv_freq=INV_FREQ):
    """`x` ``[1, heads, n, dim]`` rotated at `positions` ``[n]``, with transformers' rotary table and function."""
    freqs = positions[:, None].float() * inv_freq[None, :]
    table = torch.cat((freqs, freqs), dim=-1)[None]
    rotated, _ = apply_rotary_pos_emb(x, x, table.cos(), table.sin())
    return rotated


def original_selection(queries, keys, prompt_len, step, window, budget, selector, scaling):
    """Sorted token indices the original picks for `queries` ``[1, heads, window, dim]`` (as it rotates them:
    all at the current step's position) over the prompt's keys."""
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


def decode_context(seed, step, window, budget, prompt_len=48, heads=4, kv_heads=2):
    """The filter layer's view at decode step `step` (the last `window` queries, each rotated at its own position,
    and the prompt's keys), and the same queries rotated as the original rotates them."""
    g = torch.Generator().manual_seed(seed)
    before_rope = torch.randn(1, heads, window, DIM, generator=g)
    positions = torch.arange(prompt_len + step - window, prompt_len + step)
    ctx = SelectionContext(
        queries=rope(before_rope, positions),
        query_positions=positions,
        keys=rope(torch.randn(1, kv_heads, prompt_len, DIM, generator=g), torch.arange(prompt_len)),
        valid=torch.ones(1, prompt_len, dtype=torch.bool),
        token_budget=budget,
        scaling=DIM**-0.5,
        rope_inv_freq=INV_FREQ,
    )
    return ctx, rope(before_rope, positions[-1:].expand(window))


@pytest.mark.parametrize("selector", ["uniform", "exp"])
@pytest.mark.parametrize("window", [4, 16])
@pytest.mark.parametrize("budget", [17, 24])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_window_selectors_pick_what_the_original_picks(selector, window, budget, seed):
    policy = make_selection_policy({"type": selector, "window_size": window})
    for step in range(1, window + 3):  # the window's prompt tokens run out at step `window`
        ctx, rotated = decode_context(seed * 100 + step, step, window, budget)
        expected = original_selection(rotated, ctx.keys, 48, step, window, budget, selector, ctx.scaling)
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


def test_queries_are_turned_to_the_current_position_as_rope_would_rotate_them():
    """Partial rotary (8 of 12 dimensions), an empty window slot (position -1) and long distances included."""
    g = torch.Generator().manual_seed(7)
    before = torch.randn(2, 3, 5, 12, generator=g)
    positions = torch.tensor([-1, 90, 95, 1096, 4130])
    inv_freq = 1.0 / (500000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))

    def partial(x, at):
        return torch.cat([rope(x[..., :8], at, inv_freq), x[..., 8:]], dim=-1)

    keys = torch.randn(2, 1, 4, 12, generator=g)
    ctx = SelectionContext(partial(before, positions), positions, keys, torch.ones(2, 4, dtype=torch.bool), 2, 1.0)
    turned = queries_at_current_position(dataclasses.replace(ctx, rope_inv_freq=inv_freq))
    expected = partial(before, positions[-1:].expand(5))
    assert turned.dtype == torch.float32 and turned.shape == expected.shape
    torch.testing.assert_close(turned, expected, atol=2e-4, rtol=0)
    assert not torch.allclose(ctx.queries, expected, atol=1e-2)  # the turn is not nothing


@pytest.mark.parametrize("selector", ["uniform", "exp"])
def test_without_rotary_frequencies_the_queries_stay_where_they_are(caplog, monkeypatch, selector):
    """A context built by hand without ``rope_inv_freq``: the window is scored as it stands (each query at its
    own position), which here selects otherwise than the original; one log line says so."""
    monkeypatch.setattr("omnikv_runtime.policies.base._UNROTATED_LOGGED", False)
    policy = make_selection_policy({"type": selector, "window_size": 8})
    differs = 0
    with caplog.at_level(logging.INFO, logger="omnikv_runtime.policies.base"):
        for step in range(1, 11):
            ctx, rotated = decode_context(step, step, 8, 20)
            bare = dataclasses.replace(ctx, rope_inv_freq=None)
            assert queries_at_current_position(bare) is bare.queries
            as_they_stand = original_selection(ctx.queries, ctx.keys, 48, step, 8, 20, selector, ctx.scaling)
            assert torch.equal(policy.select(bare), as_they_stand), step
            original = original_selection(rotated, ctx.keys, 48, step, 8, 20, selector, ctx.scaling)
            differs += not torch.equal(as_they_stand, original)
    assert differs >= 3
    assert len([r for r in caplog.records if "no rotary frequencies" in r.getMessage()]) == 1


def test_a_budget_below_the_window_keeps_the_latest_window_tokens():
    """The original then selects window - step + 1 tokens, over the budget; here the budget is a hard cap."""
    ctx, _ = decode_context(3, step=1, window=16, budget=5)
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
    inv_freq = engine.model.model.rotary_emb.inv_freq
    assert torch.equal(engine.rope_inv_freq, inv_freq) and all(
        torch.equal(e.context.rope_inv_freq, inv_freq) for e in log
    )
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
    ctx, _ = decode_context(5, step=20, window=1, budget=7)
    assert torch.equal(engine.policy.select(ctx), make_selection_policy({"type": "softmax_last"}).select(ctx))


# the comparison on the bundled model, from the model's own queries before RoPE ---------------------------------

SEED_WINDOW = 16
BUNDLED_STEPS = 24
BUNDLED_FILTERS = (2, 8, 18)


def original_bundled_selection(selector, q_pre, k_pre, model, prompt_len, step, budget):
    """What the original's filter layer selects at decode step `step` (1 = the first after the prompt).

    `q_pre` ``[1, n, q_heads * dim]`` holds the layer's query projections before RoPE, the prompt's and then
    every decode step's up to this one; `k_pre` ``[1, prompt_len, kv_heads * dim]`` the prompt's key
    projections. As its code does: the window's queries are all rotated with the current step's position
    (the model's own rotary embedding and ``apply_rotary_pos_emb``), the keys were rotated at their own
    positions when cached; then its scoring, top-k and sort.
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    config = model.config
    dim = config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads
    rotary = model.model.rotary_emb
    windowed = "last" not in selector
    seen = q_pre[:, : prompt_len + step]
    window = seen[:, -SEED_WINDOW:] if windowed else seen[:, -1:]
    queries = window.view(1, window.shape[1], -1, dim).transpose(1, 2)
    keys = k_pre.view(1, prompt_len, -1, dim).transpose(1, 2)
    current = torch.tensor([[prompt_len + step - 1]])
    cos, sin = rotary(queries, current)
    queries, _ = apply_rotary_pos_emb(queries, queries, cos, sin)  # every query at the current position
    cos, sin = rotary(keys, torch.arange(prompt_len)[None])
    _, keys = apply_rotary_pos_emb(keys, keys, cos, sin)  # as the cache holds them
    consider, wanted, in_window = prompt_len, budget, 0
    if windowed:
        in_window = max(0, SEED_WINDOW - step)
        consider -= in_window
        wanted = max(1, budget - in_window)
    keys = keys[:, :, :consider].repeat_interleave(group, dim=1)
    if not windowed:
        score = queries @ keys.transpose(2, 3) / math.sqrt(dim)
        if selector == "softmax_before_last":
            score = torch.softmax(score, dim=-1)
        total = score[..., -1, :].max(dim=1).values
    else:
        total = None
        for query in queries.split(1, dim=2):
            score = torch.softmax(query @ keys.transpose(2, 3) / math.sqrt(dim), dim=-1).max(dim=1).values
            score = score.sum(dim=-2)
            if total is None:
                total = score
            else:
                total = total + score if selector == "uniform" else total * 0.5 + score
    picked = torch.topk(total, min(wanted, total.shape[-1]), dim=-1, sorted=True).indices
    if windowed:
        picked = torch.cat([picked, torch.arange(prompt_len - in_window, prompt_len)[None]], dim=1)
    return torch.sort(picked, dim=-1).values


@pytest.fixture(scope="module")
def bundled_prompt(bundled_session):
    from omnikv_runtime.eval.passkey import build_passkey_prompt

    _, tokenizer = bundled_session
    text, _ = build_passkey_prompt(tokenizer, 320, 0.5, seed=0)  # budget 21 at 0.067: 6 above the window's 15
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("selector", ["last", "softmax_before_last", "uniform", "exp"])
def test_the_bundled_model_selects_what_the_original_selects(bundled, bundled_prompt, selector):
    """A seed config at budget 0.067 over 24 decode steps: every filter layer's selection at every step equals
    the original's, computed from the model's own queries and keys before RoPE."""
    model, _ = bundled
    ids = bundled_prompt
    seed = {"do_select_layers": ",".join(map(str, BUNDLED_FILTERS)), "num_wait_load_layers": 1}
    seed |= {"num_of_selected_tokens": 0.067, "selector_cls": selector, "window_size": SEED_WINDOW}
    seed |= {"real_offload": True, "dense_more": True, "model_cls": "multi", "cache_cls": "multi"}
    engine = okv.initialize(model, seed)
    recorder = SelectionRecorder(contexts=False)
    engine.add_listener(recorder)
    projections: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for layer in BUNDLED_FILTERS:
        attention = model.model.layers[layer].self_attn
        for name in ("q_proj", "k_proj"):
            store = projections.setdefault((layer, name), [])
            hooks.append(getattr(attention, name).register_forward_hook(lambda m, a, out, s=store: s.append(out)))
    try:
        with torch.inference_mode():
            engine.generate(ids, max_new_tokens=BUNDLED_STEPS + 1, eos_token_id=[], pad_token_id=0)  # no early stop
    finally:
        for hook in hooks:
            hook.remove()
    prompt_len = ids.shape[1]
    budget = int(0.067 * prompt_len)  # the original's budget: no floor
    assert budget < 64  # the runtime's own floor would have changed it
    events = {(event.layer, event.step + 1): event.indices for event in recorder.records}
    assert sorted(events) == [(layer, step) for layer in BUNDLED_FILTERS for step in range(1, BUNDLED_STEPS + 1)]
    for layer in BUNDLED_FILTERS:
        q_pre = torch.cat(projections[(layer, "q_proj")], dim=1)
        k_pre = projections[(layer, "k_proj")][0]
        assert q_pre.shape[1] == prompt_len + BUNDLED_STEPS and k_pre.shape[1] == prompt_len
        for step in range(1, BUNDLED_STEPS + 1):
            expected = original_bundled_selection(selector, q_pre, k_pre, model, prompt_len, step, budget)
            assert torch.equal(events[(layer, step)], expected), (layer, step)

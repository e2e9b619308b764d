"""The policy library: every registered selection policy inside the runtime on tiny Llama and Qwen2
models (budget, padding, determinism, drops), the baselines' own behaviour, and registry errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import user_policy_example
from okv_testlib import PAD, PAD_TOKENS, PROMPT_LEN, dense_reference, make_model, make_prompt, omni, record_selections

import omnikv_runtime as okv
from omnikv_runtime.policies import SELECTION_POLICIES, SelectionContext, make_selection_policy
from omnikv_runtime.policies.paging import paged

BUDGET = 12
NEW_TOKENS = 6
LOSSY = ("streaming_llm", "h2o", "snapkv")
FAMILIES = ("llama", "qwen2")


@pytest.fixture(scope="module", params=FAMILIES)
def family_runs(request):
    """Per family, every registered policy run twice (fresh engines) on a left-padded batch of 2."""
    family = request.param
    model = make_model(family)
    ids, mask = make_prompt(2)
    runs = {}
    for name in sorted(SELECTION_POLICIES):
        outputs, logs, dropped = [], [], []
        for _ in range(2):
            engine = okv.initialize(model, omni(budget=BUDGET, selector={"type": name}))
            log = record_selections(engine)
            outputs.append(engine.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD))
            logs.append(log)
            dropped.append(engine.stats()["dropped_tokens"])
        runs[name] = (engine, outputs, logs, dropped)
    return family, runs


@pytest.mark.parametrize("name", sorted(SELECTION_POLICIES))
def test_policy_matrix_in_the_runtime(family_runs, name):
    family, runs = family_runs
    engine, outputs, logs, dropped = runs[name]
    log = logs[0]
    filters = [s.filter_layer for s in engine.plan.segments]
    assert len(log) == len(filters) * (NEW_TOKENS - 1)  # every filter layer at every decode step
    assert [event.layer for event in log[: len(filters)]] == filters
    mask = make_prompt(2)[1].bool()
    for event in log:
        valid, indices = event.context.valid, event.indices
        assert torch.equal(valid, mask)  # the policy is told exactly which positions are padding
        expected = PROMPT_LEN if name == "full" else BUDGET
        assert event.context.token_budget == BUDGET and indices.shape == (2, expected)
        assert (indices[:, 1:] > indices[:, :-1]).all() and indices.max() < PROMPT_LEN
        if name != "full":  # 33 real tokens in the padded row > budget: padding is never picked
            assert valid.gather(1, indices).all() and (indices[1] >= PAD_TOKENS).all()
    # deterministic: a second engine reproduces tokens and every selection
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(logs[0], logs[1]))
    policy = engine.policy
    if name in LOSSY:
        assert not policy.lossless
        # each row keeps exactly the budget of its real tokens: 40 - 12 dropped in row 0, 33 - 12 in row 1
        assert dropped[0] == {str(layer): PROMPT_LEN - BUDGET for layer in filters}
        for layer in filters:  # a dropped token never comes back: every selection is the first one
            steps = [event.indices for event in log if event.layer == layer]
            assert all(torch.equal(step, steps[0]) for step in steps)
    else:
        assert policy.lossless and dropped[0] == {}
    if name == "full":
        assert torch.equal(outputs[0], dense_reference(family, 2)[:, : PROMPT_LEN + NEW_TOKENS])


def test_the_matrix_is_not_trivial(family_runs):
    """Control: policies choose differently, and a sparse selection changes the output versus dense."""
    family, runs = family_runs
    firsts = {name: runs[name][2][0][0].indices for name in runs if name != "full"}
    assert len({tuple(v.flatten().tolist()) for v in firsts.values()}) >= len(firsts) - 1
    dense = dense_reference(family, 2)[:, : PROMPT_LEN + NEW_TOKENS]
    assert sum(not torch.equal(runs[name][1][0], dense) for name in runs) >= 5


@pytest.mark.parametrize("name", LOSSY)
def test_lossy_state_resets_for_each_request(name):
    """A second request on the same engine selects as a fresh engine would, not from the first's leftovers."""
    model = make_model("llama")
    first_ids, first_mask = make_prompt(1, seed=3)
    ids, mask = make_prompt(1, seed=4)
    engine = okv.initialize(model, omni(budget=BUDGET, selector={"type": name}))
    engine.generate(first_ids, attention_mask=first_mask, max_new_tokens=4, pad_token_id=PAD)
    log = record_selections(engine)
    reused = engine.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)
    fresh_engine = okv.initialize(model, omni(budget=BUDGET, selector={"type": name}))
    fresh_log = record_selections(fresh_engine)
    fresh = fresh_engine.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)
    assert torch.equal(reused, fresh)
    assert all(torch.equal(a.indices, b.indices) for a, b in zip(log, fresh_log))
    assert engine.stats()["dropped_tokens"] == {"1": PROMPT_LEN - BUDGET, "4": PROMPT_LEN - BUDGET}


def synthetic(
    keys: torch.Tensor,
    queries: torch.Tensor,
    budget: int,
    valid: torch.Tensor | None = None,
    layer=0,
    state: dict | None = None,
):
    """A decode-step context: queries at the positions right after the context, the last one current.

    ``state`` is the filter layer's per-request policy state (what the cache owns); None: a fresh one."""
    length, window = keys.shape[2], queries.shape[2]
    valid = torch.ones(keys.shape[0], length, dtype=torch.bool) if valid is None else valid
    positions = torch.arange(length - window + 1, length + 1)
    state = {} if state is None else state
    return SelectionContext(queries, positions, keys, valid, budget, keys.shape[-1] ** -0.5, layer=layer, state=state)


def planted(length: int = 64, dim: int = 16, window: int = 1, spots=(20,), strength: float = 6.0, seed: int = 0):
    """Random small keys; every query aligns with the keys at `spots`."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, generator=g)
    u = u / u.norm()
    keys = 0.3 * torch.randn(1, 2, length, dim, generator=g)
    queries = strength * u + 0.1 * torch.randn(1, 4, window, dim, generator=g)
    for spot in spots:
        keys[:, :, spot] = strength * u
    return keys, queries


def test_streaming_llm_keeps_sinks_and_the_latest_tokens_per_row():
    keys, queries = planted(length=30, spots=())
    keys = keys.expand(2, -1, -1, -1)
    valid = torch.ones(2, 30, dtype=torch.bool)
    valid[1, :5] = False
    policy = make_selection_policy({"type": "streaming_llm", "sink_tokens": 2})
    state: dict = {}
    indices = policy.select(synthetic(keys, queries.expand(2, -1, -1, -1), 6, valid, state=state))
    assert indices.tolist() == [[0, 1, 26, 27, 28, 29], [5, 6, 26, 27, 28, 29]]
    assert policy.dropped_tokens({0: state}) == {0: 24}  # row 0: 30 - 6; row 1: 25 - 6


def test_h2o_keeps_the_heavy_hitter_and_recent_tokens_and_accumulates():
    keys, queries = planted(length=64, window=8, spots=(9,))
    policy = make_selection_policy({"type": "h2o", "window_size": 8, "recent_ratio": 0.5})
    state: dict = {}  # one request's state for this filter layer, carried from step to step
    first = policy.select(synthetic(keys, queries, 8, state=state))[0].tolist()
    assert 9 in first and first[-4:] == [60, 61, 62, 63]
    assert policy.dropped_tokens({0: state}) == {0: 56}
    # a later step whose query looks elsewhere cannot bring a dropped token back
    keys2, queries2 = planted(length=64, window=8, spots=(30,), seed=1)
    second = policy.select(synthetic(keys, queries2, 8, state=state))[0].tolist()
    assert second == first and 30 not in second
    # the same step on a fresh request (a fresh state) picks the new heavy hitter
    assert 30 in policy.select(synthetic(keys2, queries2, 8, state={}))[0].tolist()
    # and the first request's state is untouched by it
    assert policy.select(synthetic(keys, queries2, 8, state=state))[0].tolist() == first


def test_snapkv_pools_neighbours_and_keeps_the_observation_window():
    keys, queries = planted(length=64, window=4, spots=(20,))
    policy = make_selection_policy({"type": "snapkv", "window_size": 4, "kernel_size": 5})
    chosen = policy.select(synthetic(keys, queries, 8))[0].tolist()
    assert chosen[-3:] == [61, 62, 63]  # the window's prompt tokens (the last query is the current step)
    assert 20 in chosen and {18, 19, 21, 22} & set(chosen)  # pooling lends the hit's neighbours its score
    unpooled = make_selection_policy({"type": "snapkv", "window_size": 4, "kernel_size": 1})
    assert set(unpooled.select(synthetic(keys, queries, 8))[0].tolist()) != set(chosen)


@pytest.mark.parametrize("length", [11, 12, 13, 3])  # one less than 3 pages of 4, exactly 3, one more; under one
def test_paged_puts_token_t_at_page_t_div_size_and_padding_is_never_valid(length):
    keys = torch.randn(2, 3, length, 5)
    valid = torch.rand(2, length) > 0.4
    valid[0] = True  # a row valid throughout: its padding is still not
    pages_keys, pages_valid = paged(keys, valid, 4)
    pages = {11: 3, 12: 3, 13: 4, 3: 1}[length]
    assert pages_keys.shape == (2, 3, pages, 4, 5) and pages_valid.shape == (2, pages, 4)
    for t in range(pages * 4):
        if t < length:
            assert torch.equal(pages_keys[:, :, t // 4, t % 4], keys[:, :, t])
            assert torch.equal(pages_valid[:, t // 4, t % 4], valid[:, t])
        else:  # padding: zero keys, never valid
            assert not pages_valid[:, t // 4, t % 4].any() and not pages_keys[:, :, t // 4, t % 4].any()
    assert pages_valid.sum() == valid.sum()


def test_paged_refuses_a_page_size_or_mask_that_does_not_fit():
    keys = torch.randn(1, 2, 6, 4)
    for size in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"page_size must be an integer of at least 1, got {size!r}"):
            paged(keys, torch.ones(1, 6, dtype=torch.bool), size)
    for mask in (torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 6)):
        with pytest.raises(ValueError, match=r"valid \(1, [56]\) torch\.\w+ must be a bool \[batch, context_len\]"):
            paged(keys, mask, 2)


def test_quest_takes_the_page_whose_bound_is_highest_and_the_bound_is_an_upper_bound():
    keys, queries = planted(length=64, spots=(37,))
    policy = make_selection_policy({"type": "quest", "page_size": 8})
    assert policy.select(synthetic(keys, queries, 8))[0].tolist() == list(range(32, 40))
    # control: for every page, sum_d max(q min, q max) >= the best q.k inside it
    q = queries[0, 0, -1]
    pages = keys[0, 0].reshape(8, 8, -1)
    bound = torch.maximum(q * pages.amin(1), q * pages.amax(1)).sum(-1)
    assert (bound >= (pages @ q).amax(-1) - 1e-5).all()


def test_infllm_retrieves_the_block_of_matching_representatives_beside_sinks_and_local_tokens():
    keys, queries = planted(length=96, spots=range(40, 48))
    policy = make_selection_policy({"type": "infllm", "block_size": 8, "init_tokens": 2, "local_ratio": 0.25})
    state: dict = {}
    chosen = policy.select(synthetic(keys, queries, 16, state=state))[0].tolist()
    assert {0, 1, 92, 93, 94, 95} <= set(chosen)  # 2 initial tokens, 16 * 0.25 local ones
    assert set(range(40, 48)) <= set(chosen)  # the matching block, whole
    assert len(chosen) == 16 and policy.lossless and policy.dropped_tokens({0: state}) == {}


def test_lossy_state_follows_the_context():
    """Per filter layer (each its own state); a shrinking context or another batch size starts afresh; growth
    adds live tokens."""
    policy = make_selection_policy({"type": "streaming_llm", "sink_tokens": 1})
    states: dict[int, dict] = {3: {}, 7: {}}
    keys, queries = planted(length=20, spots=())
    policy.select(synthetic(keys, queries, 4, layer=3, state=states[3]))
    policy.select(synthetic(keys, queries, 4, layer=7, state=states[7]))
    assert policy.dropped_tokens(states) == {3: 16, 7: 16}
    assert policy.dropped_tokens({3: states[3], 9: {}}) == {3: 16}  # a layer that never selected dropped nothing
    grown_keys, grown_queries = planted(length=30, spots=())
    grown = policy.select(synthetic(grown_keys, grown_queries, 4, layer=3, state=states[3]))
    assert grown[0].tolist() == [0, 27, 28, 29]
    assert policy.dropped_tokens(states) == {3: 26, 7: 16}
    small_keys, small_queries = planted(length=10, spots=())
    small = policy.select(synthetic(small_keys, small_queries, 4, layer=3, state=states[3]))
    assert small[0].tolist() == [0, 7, 8, 9]
    assert policy.dropped_tokens(states) == {3: 6, 7: 16}
    # another batch size starts afresh too: tokens 5 and 6, dropped above, are alive again
    wide_keys, wide_queries = small_keys.expand(2, -1, -1, -1), small_queries.expand(2, -1, -1, -1)
    wide = policy.select(synthetic(wide_keys, wide_queries, 6, layer=3, state=states[3]))
    assert wide.tolist() == [[0, 5, 6, 7, 8, 9]] * 2 and policy.dropped_tokens(states) == {3: 4, 7: 16}


# defaults ------------------------------------------------------------------------------------------------


def test_unset_selector_fields_keep_the_policys_defaults():
    engine = okv.initialize(make_model("llama"), omni(selector={"type": "h2o"}))
    assert engine.policy.window_size == 4096
    engine = okv.initialize(make_model("llama"), omni(selector={"type": "snapkv", "window_size": 8}))
    assert engine.policy.window_size == 8


# the worked example of docs/policies.md -------------------------------------------------------------------

DOCS = Path(__file__).resolve().parents[1] / "docs" / "policies.md"


def test_docs_example_is_the_tested_user_policy():
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S)
    source = Path(user_policy_example.__file__).read_text(encoding="utf-8")
    example = next(block for block in blocks if "class RecentBoostPolicy" in block)
    assert example in source
    assert len(example.splitlines()) <= 30
    # the docs' imports and class run on their own and select as the tested class does
    namespace: dict = {}
    exec(next(block for block in blocks if block.startswith("from dataclasses")) + example, namespace)
    keys, queries = planted(length=64, spots=(20,))
    ctx = synthetic(keys, queries, 10)
    chosen = namespace["RecentBoostPolicy"](recent=4).select(ctx)
    assert torch.equal(chosen, user_policy_example.RecentBoostPolicy(recent=4).select(ctx))
    assert 20 in chosen[0].tolist() and chosen[0, -4:].tolist() == [60, 61, 62, 63]


def test_docs_example_runs_in_the_engine():
    model = make_model("qwen2")
    ids, mask = make_prompt(2)
    selector = {"type": "user_policy_example:RecentBoostPolicy", "recent": 5}
    engine = okv.initialize(model, omni(budget=BUDGET, selector=selector), trust_remote_code=True)
    assert type(engine.policy) is user_policy_example.RecentBoostPolicy and engine.policy.recent == 5
    log = record_selections(engine)
    engine.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)
    for indices in (event.indices for event in log):
        assert indices.shape == (2, BUDGET) and set(range(PROMPT_LEN - 5, PROMPT_LEN)) <= set(indices[0].tolist())
        assert (indices[1] >= int((mask[1] == 0).sum())).all()
    # beside the kept recent tokens it ranks like `last`: with recent=0 it is `last`
    last = okv.initialize(model, omni(budget=BUDGET, selector={"type": "last"}))
    zero = okv.initialize(model, omni(budget=BUDGET, selector={**selector, "recent": 0}), trust_remote_code=True)
    outputs = [e.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD) for e in (last, zero)]
    assert torch.equal(outputs[0], outputs[1])

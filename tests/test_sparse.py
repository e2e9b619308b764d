"""Sparse layers attend to `budget` selected tokens plus the tail, and the host tier keeps every token."""

from __future__ import annotations

import pytest
import torch
from okv_testlib import (
    NUM_LAYERS,
    PAD,
    PROMPT_LEN,
    SPARSE_LAYERS,
    arena_kv,
    arena_rows_at,
    capture_caches,
    dense_cache,
    is_sparse,
    make_model,
    make_prompt,
    omni,
    split_forwards,
)

import omnikv_runtime as okv
from omnikv_runtime.layout import Role

BUDGET = 8
STEPS = 12  # new tokens: 1 prefill forward + 11 decode forwards


@pytest.mark.parametrize("batch", [1, 2])
def test_sparse_layers_see_budget_plus_tail_keys(batch, attention_spy):
    model = make_model("llama")
    ids, mask = make_prompt(batch)
    engine = okv.initialize(model, omni(budget=BUDGET))
    assert engine.plan.sparse_layers == SPARSE_LAYERS
    calls = attention_spy()
    engine.generate(ids, attention_mask=mask, max_new_tokens=STEPS, pad_token_id=PAD)

    forwards = split_forwards(calls)
    assert len(forwards) == STEPS
    prefill, decode = forwards[0], forwards[1:]
    assert [(c.layer, c.keys, c.queries) for c in prefill] == [(i, PROMPT_LEN, PROMPT_LEN) for i in range(NUM_LAYERS)]
    for step, forward in enumerate(decode, start=1):
        assert [c.layer for c in forward] == list(range(NUM_LAYERS))
        for call in forward:
            expected = BUDGET + step if is_sparse(engine, call.layer) else PROMPT_LEN + step
            assert (call.layer, call.queries, call.keys) == (call.layer, 1, expected), f"decode step {step}"
    stats = engine.stats()
    assert stats["selected_per_step"] == {"1": [BUDGET] * (STEPS - 1), "4": [BUDGET] * (STEPS - 1)}


@pytest.mark.parametrize("selector", ["last", "uniform", "user_policy_example:VaryingCountPolicy"])
def test_sparse_keys_are_the_selected_rows_then_the_tail(selector, attention_spy):
    """At every decode step a sparse layer's keys/values are its arena rows at the selection, then the tail rows."""
    model = make_model("qwen3")
    ids, mask = make_prompt(2)
    engine = okv.initialize(model, omni(budget=BUDGET, selector=selector))
    caches = capture_caches(engine)
    seen: list[tuple[int, int, bool, bool]] = []

    def check(module, query, key, value, attention_mask):
        layer = module.layer_idx
        if query.shape[2] != 1 or not is_sparse(engine, layer):
            return
        cache = caches[-1]
        segment = cache.plan.segment_of[layer]
        selection = cache.selections[segment]
        sel_keys, sel_values = arena_rows_at(cache, layer, selection)
        all_keys, all_values = arena_kv(cache, layer)
        expected_keys = torch.cat([sel_keys, all_keys[:, :, cache.context_len :]], dim=2)
        expected_values = torch.cat([sel_values, all_values[:, :, cache.context_len :]], dim=2)
        seen.append((layer, selection.shape[1], torch.equal(key, expected_keys), torch.equal(value, expected_values)))

    attention_spy(hook=check)
    engine.generate(ids, attention_mask=mask, max_new_tokens=STEPS, pad_token_id=PAD)
    assert len(seen) == len(SPARSE_LAYERS) * (STEPS - 1)
    assert all(keys_ok and values_ok for _, _, keys_ok, values_ok in seen), [s for s in seen if not all(s[2:])]
    counts = {count for _, count, _, _ in seen}
    if "Varying" in selector:
        assert counts == {BUDGET, BUDGET - 3}  # the tail really had to move
    else:
        assert counts == {BUDGET}


@pytest.mark.parametrize("selector", ["last", "softmax_last", "uniform", "exp"])
def test_padded_positions_are_never_selected(selector):
    pad = 30  # row 1 keeps 10 real tokens, more than the budget of 8
    model = make_model("llama")
    ids, mask = make_prompt(2, pad=pad)
    engine = okv.initialize(model, omni(budget=BUDGET, selector=selector))
    records = []
    select = engine.policy.select

    def recording_select(ctx):
        indices = select(ctx)
        records.append((ctx.valid.clone(), ctx.budget, indices.clone()))
        return indices

    engine.policy.select = recording_select
    engine.generate(ids, attention_mask=mask, max_new_tokens=STEPS, pad_token_id=PAD)

    assert len(records) == 2 * (STEPS - 1)  # two filter layers per decode step
    for valid, budget, indices in records:
        assert torch.equal(valid, mask.bool())  # the policy is told exactly which positions are padding
        assert budget == BUDGET and indices.shape == (2, BUDGET)
        assert (indices[:, 1:] > indices[:, :-1]).all()
        assert valid.gather(1, indices).all(), indices[1].tolist()


def test_host_tier_holds_every_token_bit_for_bit():
    family, new_tokens = "mistral", STEPS
    model = make_model(family)
    ids, mask = make_prompt(2)
    engine = okv.initialize(model, omni(budget=BUDGET))
    caches = capture_caches(engine)
    engine.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=PAD)
    (cache,) = caches
    _, prefill = dense_cache(family, ids, mask, new_tokens=1)  # dense KV of the prompt alone
    stored = PROMPT_LEN + new_tokens - 1  # the last generated token is never fed back

    assert cache.get_seq_length() == stored
    for segment in engine.plan.segments:
        arena = cache.arenas[segment.index]
        assert arena.lengths == [stored] * len(segment.sparse_layers)
    for layer in SPARSE_LAYERS:
        keys, values = arena_kv(cache, layer)
        assert keys.shape == (2, 2, stored, 16)
        assert torch.equal(keys[:, :, :PROMPT_LEN], prefill.layers[layer].keys)
        assert torch.equal(values[:, :, :PROMPT_LEN], prefill.layers[layer].values)

        work = cache.layers[layer]
        assert (work.selected, work.tail) == (BUDGET, new_tokens - 1)
        assert work.keys.shape[2] == BUDGET + new_tokens - 1
        # generated tokens: the arena rows equal the tail rows the layer attended to
        assert torch.equal(keys[:, :, PROMPT_LEN:], work.keys[:, :, BUDGET:])
        assert torch.equal(values[:, :, PROMPT_LEN:], work.values[:, :, BUDGET:])
        # selected rows in the working buffer are the arena rows at the last selection
        selection = cache.selections[engine.plan.segment_of[layer]]
        sel_keys, sel_values = arena_rows_at(cache, layer, selection)
        assert torch.equal(work.keys[:, :, :BUDGET], sel_keys)
        assert torch.equal(work.values[:, :, :BUDGET], sel_values)


def test_budget_one_arena_equals_the_dense_cache(family):
    new_tokens = STEPS
    model = make_model(family)
    ids, mask = make_prompt(2)
    engine = okv.initialize(model, omni(budget=1.0))
    caches = capture_caches(engine)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=PAD)
    (cache,) = caches
    sequences, dense = dense_cache(family, ids, mask, new_tokens)
    assert torch.equal(out, sequences)
    assert dense.get_seq_length() == cache.get_seq_length() == PROMPT_LEN + new_tokens - 1
    for layer in range(NUM_LAYERS):
        if engine.plan.role(layer) is Role.SPARSE:
            keys, values = arena_kv(cache, layer)
        else:
            keys, values = cache.layers[layer].keys, cache.layers[layer].values
        assert torch.equal(keys, dense.layers[layer].keys), layer
        assert torch.equal(values, dense.layers[layer].values), layer


def test_stats_and_memory_report_count_the_tiers():
    new_tokens = STEPS
    model = make_model("llama")
    ids, mask = make_prompt(2)
    engine = okv.initialize(model, omni(budget=BUDGET))
    engine.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=PAD)
    stored = PROMPT_LEN + new_tokens - 1
    token_bytes = 2 * 2 * 2 * 16 * 4  # batch 2, keys and values, 2 KV heads, head_dim 16, float32
    sparse = len(SPARSE_LAYERS)

    tiers = engine.memory_report()["tiers"]
    assert tiers["gpu_selected"] == sparse * BUDGET * token_bytes
    assert tiers["gpu_tail"] == sparse * (new_tokens - 1) * token_bytes
    assert tiers["host"] == sparse * stored * token_bytes
    assert tiers["host_allocated"] >= tiers["host"]
    assert tiers["gpu_dense"] >= (NUM_LAYERS - sparse) * stored * token_bytes

    transfer = engine.stats()["transfer"]
    assert transfer["gathers"] == 2 * (new_tokens - 1)  # one per segment and decode step
    assert transfer["bytes_fetched"] == (new_tokens - 1) * sparse * BUDGET * token_bytes
    assert transfer["bytes_written"] == sparse * stored * token_bytes
    assert transfer["bytes_prefill_read"] == 0  # host tier and compute share the CPU: nothing crosses

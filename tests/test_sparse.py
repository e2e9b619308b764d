"""Sparse layers attend to `budget` selected tokens plus the tail, and the host tier keeps every token."""

from __future__ import annotations

import pytest
import torch
from okv_testlib import (
    NUM_LAYERS,
    PAD,
    PAD_TOKENS,
    PROMPT_LEN,
    SPARSE_LAYERS,
    arena_kv,
    arena_rows_at,
    capture_caches,
    current_note,
    dense_cache,
    dense_reference,
    is_sparse,
    make_model,
    make_prompt,
    omni,
    reference_attention,
    source_kv,
    source_span,
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
    assert all(c.attended == PROMPT_LEN for c in prefill)
    for step, forward in enumerate(decode, start=1):
        assert [c.layer for c in forward] == list(range(NUM_LAYERS))
        for call in forward:
            sparse = is_sparse(engine, call.layer)
            expected = BUDGET + step if sparse else PROMPT_LEN + step
            assert (call.layer, call.queries, call.attended) == (call.layer, 1, expected), f"decode step {step}"
            if sparse:  # update hands back the selected rows; the tail reaches attention through the note
                assert call.keys == BUDGET, f"decode step {step}"
            else:  # a dense layer's whole buffer, limited by the device-side length
                assert call.keys >= PROMPT_LEN + step, f"decode step {step}"
    stats = engine.stats()
    assert stats["selected_per_step"] == {"1": [BUDGET] * (STEPS - 1), "4": [BUDGET] * (STEPS - 1)}


@pytest.mark.parametrize("offload", ["cpu", "none"])
@pytest.mark.parametrize("selector", ["last", "uniform", "user_policy_example:VaryingCountPolicy"])
def test_sparse_keys_are_the_selected_rows_then_the_tail(selector, offload, attention_spy):
    """At every decode step a sparse layer attends to its arena rows at the selection, then the tail rows (every
    token generated so far, the current one included), and its output is attention over exactly those."""
    model = make_model("qwen3")
    ids, mask = make_prompt(2)
    config = omni(budget=BUDGET, selector=selector, offload={"device": offload})
    engine = okv.initialize(model, config, trust_remote_code=True)  # the user policy is imported by path
    caches = capture_caches(engine)
    seen: list[tuple[int, int, torch.Tensor, tuple, tuple]] = []  # layer, step, selection, selected KV, tail KV
    expected_outputs: dict[int, torch.Tensor] = {}
    checked_outputs = []

    def check(module, query, key, value, attention_mask):
        layer = module.layer_idx
        if query.shape[2] != 1 or not is_sparse(engine, layer):
            return
        cache = caches[-1]
        sparse_layer = cache.layers[layer]
        segment = cache.tiers.segments[cache.plan.segment_of[layer]]
        assert sparse_layer.segment == segment.index and segment.sparse_layers[sparse_layer.slot] == layer
        selection = cache.tiers.segments[segment.index].selection
        assert selection is segment.selection
        selected, tail = current_note(layer, key).sources
        sel_keys, sel_values, sel_mask = source_kv(selected)
        tail_keys, tail_values, tail_mask = source_kv(tail)
        assert sel_mask.all() and tail_mask.all()  # no padding selected (33 real tokens > budget), tail all real
        assert sel_keys.shape[2] == selection.shape[1] and tail_keys.shape[2] == cache.decode_steps
        if offload == "cpu":  # rows fetched into the staging buffer; update returned them head-major
            assert segment.staging is not None and selected.index is None
            assert torch.equal(key, sel_keys) and torch.equal(value, sel_values)
        else:  # the arena is on the compute device: attention reads its rows in place through the selection
            assert segment.staging is None and selected.index is segment.selection
        seen.append((layer, cache.decode_steps, selection.clone(), (sel_keys, sel_values), (tail_keys, tail_values)))
        keys, values = torch.cat([sel_keys, tail_keys], dim=2), torch.cat([sel_values, tail_values], dim=2)
        valid = torch.cat([sel_mask, tail_mask], dim=1)
        expected_outputs[layer] = reference_attention(query, keys, values, valid, module.scaling)

    def compare(module, query, output):
        expected = expected_outputs.pop(module.layer_idx, None)
        if expected is not None:
            torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)
            checked_outputs.append(module.layer_idx)

    attention_spy(hook=check, after=compare)
    engine.generate(ids, attention_mask=mask, max_new_tokens=STEPS, pad_token_id=PAD)
    (cache,) = caches
    assert len(seen) == len(checked_outputs) == len(SPARSE_LAYERS) * (STEPS - 1)
    assert [step for _, step, *_ in seen] == [step for step in range(1, STEPS) for _ in SPARSE_LAYERS]
    # every token is in the host tier now: the selected rows and the tail each step saw must be its rows
    for layer, step, selection, selected, tail in seen:
        all_keys, all_values = arena_kv(cache, layer)
        expected_selected = arena_rows_at(cache, layer, selection)
        assert torch.equal(selected[0], expected_selected[0]) and torch.equal(selected[1], expected_selected[1])
        end = cache.context_len + step
        assert torch.equal(tail[0], all_keys[:, :, cache.context_len : end]), (layer, step)
        assert torch.equal(tail[1], all_values[:, :, cache.context_len : end]), (layer, step)
    counts = {selection.shape[1] for _, _, selection, _, _ in seen}
    if "Varying" in selector:
        assert counts == {BUDGET, BUDGET - 3}  # the selection changes size between steps
    else:
        assert counts == {BUDGET}


@pytest.mark.parametrize("offload", ["cpu", "none"])
def test_host_tier_holds_every_token_bit_for_bit(offload):
    family, new_tokens = "mistral", STEPS
    model = make_model(family)
    ids, mask = make_prompt(2)
    engine = okv.initialize(model, omni(budget=BUDGET, offload={"device": offload}))
    caches = capture_caches(engine)
    engine.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=PAD)
    (cache,) = caches
    _, prefill = dense_cache(family, ids, mask, new_tokens=1)  # dense KV of the prompt alone
    stored = PROMPT_LEN + new_tokens - 1  # the last generated token is never fed back

    assert cache.get_seq_length() == stored
    for segment in engine.plan.segments:
        arena = cache.tiers.arenas[segment.index]
        assert arena.lengths == [stored] * len(segment.sparse_layers)
    assert cache.decode_steps == int(cache.counters.tail_count[0]) == new_tokens - 1
    assert cache.ring_tokens >= new_tokens - 1  # no tail_tokens: every generated token stays in the tail
    for layer in SPARSE_LAYERS:
        keys, values = arena_kv(cache, layer)
        assert keys.shape == (2, 2, stored, 16)
        assert torch.equal(keys[:, :, :PROMPT_LEN], prefill.layers[layer].keys)
        assert torch.equal(values[:, :, :PROMPT_LEN], prefill.layers[layer].values)

        sparse = cache.layers[layer]
        segment = cache.tiers.segments[sparse.segment]
        assert sparse.arena is segment.arena and sparse.length == stored
        selected, tail = segment.sources(sparse.slot, cache.counters)  # what the layer attended to last step
        assert (source_span(selected), source_span(tail)) == (BUDGET, new_tokens - 1)
        # generated tokens: the arena rows equal the tail rows the layer attended to
        tail_keys, tail_values, tail_mask = source_kv(tail)
        assert tail_mask.all()
        assert torch.equal(keys[:, :, PROMPT_LEN:], tail_keys)
        assert torch.equal(values[:, :, PROMPT_LEN:], tail_values)
        # the ring is packed like the arena: slot g holds generated token g of every sparse layer of the segment
        ring = segment.ring[:, : new_tokens - 1, sparse.slot]  # [batch, tokens, 2, kv_heads, head_dim]
        assert torch.equal(ring[:, :, 0], keys[:, :, PROMPT_LEN:].transpose(1, 2))
        assert torch.equal(ring[:, :, 1], values[:, :, PROMPT_LEN:].transpose(1, 2))
        # selected rows attended to are the arena rows at the last selection
        selection = cache.tiers.segments[segment.index].selection
        assert selection.shape == (2, BUDGET) and segment.selection_valid.all()
        sel_keys, sel_values, sel_mask = source_kv(selected)
        expected_keys, expected_values = arena_rows_at(cache, layer, selection)
        assert torch.equal(sel_keys, expected_keys) and torch.equal(sel_values, expected_values)
        assert torch.equal(sel_mask, segment.selection_valid)
        if offload == "cpu":  # fetched into the packed staging buffer [batch, k, layers, 2, kv_heads, head_dim]
            assert segment.staging.shape == (2, BUDGET, len(segment.sparse_layers), 2, 2, 16)
            assert torch.equal(segment.staging[:, :, sparse.slot, 0], expected_keys.transpose(1, 2))
            assert torch.equal(segment.staging[:, :, sparse.slot, 1], expected_values.transpose(1, 2))
        else:  # read in place from the arena
            assert segment.staging is None and selected.index is segment.selection


@pytest.mark.parametrize("offload", ["cpu", "none"])
def test_tokens_leaving_a_bounded_tail_ring_become_selectable_context(offload, attention_spy):
    """``omnikv.tail_tokens = 4``: generated token g goes to ring slot g % 4; once more than 4 are generated the
    older ones are selectable context instead. So `full` (every selectable token) plus the ring is exactly every
    token once: the same greedy output as dense."""
    ring = 4
    model = make_model("llama")
    ids, mask = make_prompt(2)
    config = omni(budget=BUDGET, selector="full", offload={"device": offload})
    config["omnikv"]["tail_tokens"] = ring
    engine = okv.initialize(model, config)
    caches = capture_caches(engine)
    seen: list[tuple[int, list[int], int]] = []  # step, real selected columns per row, tail columns

    def check(module, query, key, value, attention_mask):
        if query.shape[2] != 1 or not is_sparse(engine, module.layer_idx):
            return
        selected, tail = current_note(module.layer_idx, key).sources
        seen.append((caches[-1].decode_steps, source_kv(selected)[2].sum(-1).tolist(), source_span(tail)))

    attention_spy(hook=check)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=STEPS, pad_token_id=PAD)
    assert torch.equal(out, dense_reference("llama", 2, new_tokens=STEPS))
    (cache,) = caches
    assert cache.ring_tokens == ring and len(seen) == len(SPARSE_LAYERS) * (STEPS - 1)
    for step, selected, tail in seen:
        left = max(0, step - ring)  # generated tokens that left the ring
        assert selected == [PROMPT_LEN + left, PROMPT_LEN - PAD_TOKENS + left] and tail == min(step, ring), step
    generated = STEPS - 1
    assert int(cache.counters.context_len[0]) == PROMPT_LEN + generated - ring
    for layer in SPARSE_LAYERS:  # the ring holds the last 4 generated tokens, token g in slot g % 4
        keys, values = arena_kv(cache, layer)
        sparse = cache.layers[layer]
        for g in range(generated - ring, generated):
            row = cache.tiers.segments[sparse.segment].ring[:, g % ring, sparse.slot]  # [batch, 2, kv_heads, head_dim]
            assert torch.equal(row[:, 0], keys[:, :, PROMPT_LEN + g]), (layer, g)
            assert torch.equal(row[:, 1], values[:, :, PROMPT_LEN + g]), (layer, g)


def test_budget_one_arena_equals_the_dense_cache(family):
    """The prompt's KV is bit-for-bit dense; generated tokens' KV to float32 rounding: decode steps attend with
    the runtime's own kernel (``decode_attention``), not the base sdpa call, so they round differently."""
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
        for got, expected in ((keys, dense.layers[layer].keys), (values, dense.layers[layer].values)):
            assert got.shape == expected.shape, layer
            assert torch.equal(got[:, :, :PROMPT_LEN], expected[:, :, :PROMPT_LEN]), layer
            torch.testing.assert_close(got[:, :, PROMPT_LEN:], expected[:, :, PROMPT_LEN:], rtol=1e-4, atol=1e-4)


def test_stats_and_memory_report_count_the_tiers():
    new_tokens = STEPS
    model = make_model("llama")
    ids, mask = make_prompt(2)
    engine = okv.initialize(model, omni(budget=BUDGET))
    engine.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=PAD)
    stored = PROMPT_LEN + new_tokens - 1
    token_bytes = 2 * 2 * 2 * 16 * 4  # batch 2, keys and values, 2 KV heads, head_dim 16, float32
    sparse = len(SPARSE_LAYERS)

    ring_slots = 256 - PROMPT_LEN  # the tail ring: the reserve's new tokens (prompt + 12 rounded up to 256)
    tiers = engine.memory_report()["tiers"]
    assert tiers["gpu_selected"] == sparse * BUDGET * token_bytes  # the packed staging buffers
    assert tiers["gpu_tail"] == sparse * ring_slots * token_bytes
    assert tiers["host"] == sparse * stored * token_bytes
    assert tiers["host_allocated"] >= tiers["host"]
    assert tiers["gpu_dense"] >= (NUM_LAYERS - sparse) * stored * token_bytes

    transfer = engine.stats()["transfer"]
    assert transfer["gathers"] == 2 * (new_tokens - 1)  # one per segment and decode step
    assert transfer["bytes_fetched"] == (new_tokens - 1) * sparse * BUDGET * token_bytes
    assert transfer["bytes_written"] == sparse * stored * token_bytes
    assert transfer["bytes_prefill_read"] == 0  # host tier and compute share the CPU: nothing crosses

"""With nothing dropped (budget 1.0, the `full` selector, or OmniKV disabled) the runtime is exactly dense.

The reference is plain HF greedy ``model.generate`` with its default DynamicCache and sdpa, run on a
fresh model with the same weights that the runtime never touched.
"""

from __future__ import annotations

import pytest
import torch
from okv_testlib import (
    NEW_TOKENS,
    PAD,
    PAD_TOKENS,
    PLAN,
    PROMPT_LEN,
    capture_caches,
    dense_reference,
    greedy_generate,
    make_model,
    make_prompt,
    omni,
    source_span,
)

import omnikv_runtime as okv
from omnikv_runtime.cache.layers import DenseLayerKV, SparseLayerKV


def _assert_ran_omnikv(engine, batch: int, selected: int) -> None:
    """The run really went through the tiered cache: one selection per filter layer and decode step."""
    stats = engine.stats()
    assert stats["plan"] == PLAN
    assert stats["decode_steps"] == NEW_TOKENS - 1
    assert stats["new_tokens"] == NEW_TOKENS
    assert stats["batch"] == batch
    assert stats["selected_per_step"] == {"1": [selected] * (NEW_TOKENS - 1), "4": [selected] * (NEW_TOKENS - 1)}


@pytest.mark.parametrize("batch", [1, 2])
def test_budget_one_equals_dense(family, batch):
    reference = dense_reference(family, batch)
    model = make_model(family)
    ids, mask = make_prompt(batch)
    engine = okv.initialize(model, omni(budget=1.0))
    assert model.config._attn_implementation == "omnikv"
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    assert out.shape == (batch, PROMPT_LEN + NEW_TOKENS)
    assert torch.equal(out, reference)
    _assert_ran_omnikv(engine, batch, selected=PROMPT_LEN)


def _generate_with_own_cache(family: str, batch: int, keyword: str):
    model = make_model(family)
    ids, mask = make_prompt(batch)
    engine = okv.initialize(model, omni(budget=1.0))
    cache = engine.new_cache()
    assert isinstance(cache, okv.OmniKVCache)
    out = greedy_generate(model, ids, mask, NEW_TOKENS, **{keyword: cache})
    return out, cache


def _assert_cache_was_used(cache, batch: int) -> None:
    assert cache.get_seq_length() == PROMPT_LEN + NEW_TOKENS - 1
    assert cache.context_len == PROMPT_LEN
    assert len(cache.selected_log) == NEW_TOKENS - 1
    assert all(step == {1: PROMPT_LEN, 4: PROMPT_LEN} for step in cache.selected_log)
    for arena in cache.tiers.arenas:
        assert arena is not None and arena.data.shape[0] == batch
        assert arena.lengths == [PROMPT_LEN + NEW_TOKENS - 1] * len(arena.lengths)


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
@pytest.mark.filterwarnings("ignore:.*past_key_values.*:DeprecationWarning")
def test_model_generate_with_past_key_values_equals_dense(family, batch):
    out, cache = _generate_with_own_cache(family, batch, "past_key_values")
    assert torch.equal(out, dense_reference(family, batch))
    _assert_cache_was_used(cache, batch)


@pytest.mark.parametrize("batch", [1, 2])
def test_model_generate_with_cache_keyword_equals_dense(family, batch):
    import inspect

    model = make_model(family)
    if "cache" not in inspect.signature(model.forward).parameters:
        pytest.skip("this transformers version has no `cache` keyword (only past_key_values)")
    out, cache = _generate_with_own_cache(family, batch, "cache")
    assert torch.equal(out, dense_reference(family, batch))
    _assert_cache_was_used(cache, batch)


def test_disabled_engine_equals_dense(family):
    model = make_model(family)
    ids, mask = make_prompt(2)
    engine = okv.initialize(model, {"omnikv": {"enabled": False}})
    caches = capture_caches(engine)
    assert engine.plan.describe() == "D" * 8
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    assert torch.equal(out, dense_reference(family, 2))
    (cache,) = caches
    assert all(isinstance(layer, DenseLayerKV) for layer in cache.layers)
    assert cache.tiers.arenas == [] and cache.tiers.segments == []
    assert cache.get_seq_length() == PROMPT_LEN + NEW_TOKENS - 1


def test_full_selector_with_small_budget_equals_dense(family):
    model = make_model(family)
    ids, mask = make_prompt(2)
    engine = okv.initialize(model, omni(budget=8, selector="full"))
    caches = capture_caches(engine)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    assert torch.equal(out, dense_reference(family, 2))
    _assert_ran_omnikv(engine, 2, selected=PROMPT_LEN)  # the budget of 8 is ignored by `full`
    (cache,) = caches
    sparse = cache.layers[3]
    assert isinstance(sparse, SparseLayerKV)
    segment = cache.tiers.segments[sparse.segment]
    # the last step attended to every prompt token (selected) and every generated one (the tail)
    assert [source_span(s) for s in segment.sources(sparse.slot, cache.counters)] == [PROMPT_LEN, NEW_TOKENS - 1]
    # `full` selects the padding too; it is masked out: row 1's 7 pad columns do not count
    assert segment.selection_valid.sum(-1).tolist() == [PROMPT_LEN, PROMPT_LEN - PAD_TOKENS]


def test_small_budget_really_changes_the_output():
    """Control for the tests above: 8 tokens of 40 change the greedy output, so equality is not vacuous."""
    model = make_model("llama")
    ids, mask = make_prompt(2)
    engine = okv.initialize(model, omni(budget=8))
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    _assert_ran_omnikv(engine, 2, selected=8)
    assert torch.equal(out[:, :PROMPT_LEN], ids)
    assert not torch.equal(out, dense_reference("llama", 2))


def test_one_token_prompt_equals_dense():
    model = make_model("qwen2")
    ids = torch.tensor([[17]])
    reference = greedy_generate(make_model("qwen2"), ids, torch.ones_like(ids), 10)
    engine = okv.initialize(model, omni(budget=8))
    out = engine.generate(ids, max_new_tokens=10, pad_token_id=PAD)
    assert torch.equal(out, reference)
    assert engine.stats()["selected_per_step"] == {"1": [1] * 9, "4": [1] * 9}


def test_eager_base_equals_dense_eager():
    reference = dense_reference("llama", 2, attn_implementation="eager")
    model = make_model("llama", attn_implementation="eager")
    ids, mask = make_prompt(2)
    engine = okv.initialize(model, omni(budget=1.0))
    assert model.config._attn_implementation == "omnikv_eager"
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=PAD)
    assert torch.equal(out, reference)
    _assert_ran_omnikv(engine, 2, selected=PROMPT_LEN)


def test_reinitialize_keeps_the_models_attention_implementation():
    """A model handed in wins over the config's model section, also when it is initialized a second time."""
    model = make_model("llama", attn_implementation="eager")
    okv.initialize(model, omni(budget=1.0))
    okv.initialize(model, omni(budget=8))
    assert model.config._attn_implementation == "omnikv_eager"


def test_beam_search_and_sampling_reorder_the_tiered_cache():
    """Beam search reorders every tier (dense buffers, working buffers, arenas, selections) like dense."""
    ids, mask = make_prompt(2)
    with torch.no_grad():
        reference = make_model("llama").generate(
            ids, attention_mask=mask, max_new_tokens=12, num_beams=3, do_sample=False, pad_token_id=PAD
        )
    model = make_model("llama")
    engine = okv.initialize(model, omni(budget=1.0))
    output = engine.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=3, pad_token_id=PAD)
    assert torch.equal(output, reference)
    sparse = okv.initialize(model, omni(budget=8))
    beams = sparse.generate(ids, attention_mask=mask, max_new_tokens=12, num_beams=3, pad_token_id=PAD)
    assert beams.shape == (2, PROMPT_LEN + 12)
    # sampling with two returns per prompt: the same draws as transformers' with the same seed
    sample = dict(max_new_tokens=12, do_sample=True, num_return_sequences=2, pad_token_id=PAD)
    fresh = make_model("llama")
    torch.manual_seed(0)
    with torch.no_grad():
        reference = fresh.generate(ids, attention_mask=mask, **sample)
    torch.manual_seed(0)
    assert torch.equal(engine.generate(ids, attention_mask=mask, **sample), reference)
    torch.manual_seed(0)
    sampled = sparse.generate(ids, attention_mask=mask, **sample)
    torch.manual_seed(0)
    assert torch.equal(sparse.generate(ids, attention_mask=mask, **sample), sampled)  # the seed decides
    assert sampled.shape == (4, PROMPT_LEN + 12) and not torch.equal(sampled, reference)  # budget 8 changes it
    assert not torch.equal(sampled[0], sampled[1])  # two draws for one prompt differ
    stats = sparse.stats()
    assert stats["batch"] == 2 and stats["decode_steps"] == 11
    assert stats["selected_per_step"] == {"1": [8] * 11, "4": [8] * 11}

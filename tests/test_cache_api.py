"""OmniKVCache as a transformers Cache, and the model's behaviour outside OmniKV generation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from okv_testlib import (
    NUM_LAYERS,
    PROMPT_LEN,
    SPARSE_LAYERS,
    cache_keyword,
    make_model,
    make_prompt,
    omni,
    source_span,
    split_forwards,
)

import omnikv_runtime as okv
from omnikv_runtime.cache.layers import DenseLayerKV, SparseLayerKV

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from kv_fill import fill_prompt  # noqa: E402

BUDGET = 8


def test_seq_length_counts_every_token_while_sparse_layers_return_fewer(attention_spy):
    model = make_model("llama")
    ids, mask = make_prompt(2)
    engine = okv.initialize(model, omni(budget=BUDGET))
    cache = engine.new_cache()
    calls = attention_spy()
    keyword = cache_keyword(model)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, **{keyword: cache}).logits
        assert cache.get_seq_length() == PROMPT_LEN
        for step in range(1, 4):
            token = logits[:, -1:].argmax(-1)
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            logits = model(token, attention_mask=mask, **{keyword: cache}).logits
            total = PROMPT_LEN + step
            assert cache.get_seq_length() == total
            assert [cache.get_seq_length(layer) for layer in range(NUM_LAYERS)] == [total] * NUM_LAYERS
            forward = {c.layer: c for c in split_forwards(calls)[-1]}
            # update hands a sparse layer's attention its selected rows; the tail of `step` tokens comes beside them
            assert [forward[layer].keys for layer in SPARSE_LAYERS] == [BUDGET] * len(SPARSE_LAYERS)
            assert [forward[layer].attended for layer in SPARSE_LAYERS] == [BUDGET + step] * len(SPARSE_LAYERS)
            assert cache.decode_steps == int(cache.counters.tail_count[0]) == step
            for layer in SPARSE_LAYERS:
                sparse = cache.layers[layer]
                sources = cache.tiers.segments[sparse.segment].sources(sparse.slot, cache.counters)
                assert [source_span(source) for source in sources] == [BUDGET, step]
            assert cache.get_mask_sizes(1, 0)[0] == total + 1
    assert len(cache.selected_log) == 3


@pytest.mark.parametrize("style", ["plain", "kwargs", "positional"])
def test_update_call_styles(tiny_llama, style):
    engine = okv.initialize(tiny_llama, omni(budget=BUDGET))
    cache = engine.new_cache()

    def update(keys, values, layer):
        if style == "plain":
            return cache.update(keys, values, layer)
        if style == "kwargs":
            return cache.update(keys, values, layer, kwargs={})
        return cache.update(keys, values, layer, {})

    g = torch.Generator().manual_seed(0)
    first = [(torch.randn(2, 2, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g)) for _ in range(8)]
    second = [(torch.randn(2, 2, 3, 16, generator=g), torch.randn(2, 2, 3, 16, generator=g)) for _ in range(8)]
    for layer, (keys, values) in enumerate(first):
        out_keys, out_values = update(keys, values, layer)
        assert torch.equal(out_keys, keys) and torch.equal(out_values, values)
    assert cache.get_seq_length() == 5
    for layer, (keys, values) in enumerate(second):  # a second prefill chunk: the whole history
        out_keys, out_values = update(keys, values, layer)
        if layer in SPARSE_LAYERS:  # the chunk; the earlier tokens stay in the host tier, read back in blocks
            assert out_keys is keys and out_values is values
            earlier = cache.layers[layer].earlier
            assert earlier.tokens == 5
            earlier_keys, earlier_values = earlier.arena.read(earlier.slot, earlier.tokens)
            assert torch.equal(earlier_keys, first[layer][0]) and torch.equal(earlier_values, first[layer][1])
            continue
        assert torch.equal(out_keys, torch.cat([first[layer][0], keys], dim=2))
        assert torch.equal(out_values, torch.cat([first[layer][1], values], dim=2))
    assert [cache.get_seq_length(layer) for layer in range(8)] == [8] * 8
    assert [type(layer) for layer in cache.layers] == [
        SparseLayerKV if layer in SPARSE_LAYERS else DenseLayerKV for layer in range(8)
    ]


def _reference_forward(model, ids, mask):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits, model(ids, attention_mask=mask, use_cache=False).logits


def test_forward_without_a_cache_is_unchanged(family):
    model = make_model(family)
    ids, mask = make_prompt(2)
    before, before_no_cache = _reference_forward(model, ids, mask)
    okv.initialize(model, omni(budget=BUDGET))
    assert model.config._attn_implementation == "omnikv"
    after, after_no_cache = _reference_forward(model, ids, mask)
    assert torch.equal(after, before)
    assert torch.equal(after_no_cache, before_no_cache)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, make_model(family)(ids).logits)  # no mask at all


def _training_step(model, ids, mask):
    model.train()
    model.zero_grad(set_to_none=True)
    loss = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    loss.backward()
    model.eval()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_training_step_gradients_are_unchanged(family):
    model = make_model(family)
    ids, mask = make_prompt(2)
    loss_before, grads_before = _training_step(model, ids, mask)
    okv.initialize(model, omni(budget=BUDGET))
    loss_after, grads_after = _training_step(model, ids, mask)
    assert torch.isfinite(loss_before) and loss_before > 0
    assert torch.equal(loss_after, loss_before)
    assert grads_after.keys() == grads_before.keys() and len(grads_before) == len(list(model.parameters()))
    for name, grad in grads_before.items():
        assert grad.abs().sum() > 0, name
        assert torch.equal(grads_after[name], grad), name


@pytest.mark.parametrize("budget", [1.0, BUDGET])
def test_a_cache_filled_without_the_model_decodes_like_one_filled_by_prefill(budget):
    """The benchmarks' direct fill (benchmarks/kv_fill.py) gives the same decode steps as a real prefill."""
    model = make_model("llama")
    ids, _ = make_prompt(1)
    engine = okv.initialize(model, omni(budget=budget))
    keyword = cache_keyword(model)
    dense = engine.new_cache(prompt_tokens=PROMPT_LEN)
    filled = engine.new_cache(prompt_tokens=PROMPT_LEN)
    with torch.no_grad():
        logits = model(ids, **{keyword: dense}).logits
        reference = model(ids, use_cache=True).past_key_values

        def layer_kv(layer: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            keys, values = reference.layers[layer].keys, reference.layers[layer].values
            return keys[:, :, start : start + count], values[:, :, start : start + count]

        fill_prompt(filled, PROMPT_LEN, 7, layer_kv)  # chunks of 7, every layer each time
        assert filled.get_seq_length() == PROMPT_LEN and filled.context_len == PROMPT_LEN
        token = logits[:, -1:].argmax(-1)
        for step in range(4):
            positions = torch.tensor([[PROMPT_LEN + step]])
            expected = model(token, position_ids=positions, **{keyword: dense}).logits
            got = model(token, position_ids=positions, **{keyword: filled}).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            token = expected[:, -1:].argmax(-1)


def test_a_filled_cache_decodes_through_a_recorded_loop():
    """The decode benchmark's path: a cache filled without the model, then a decode loop whose first step
    already reserves every buffer a recording reads (no prefill forward ever marked the prompt's columns)."""
    from omnikv_runtime.decode.graph import EagerRecorder
    from omnikv_runtime.decode.loop import DecodeLoop, StopSettings
    from omnikv_runtime.decode.sampling import SamplingSettings

    model = make_model("llama")
    ids, _ = make_prompt(1)
    engine = okv.initialize(model, omni(budget=BUDGET))
    keyword = cache_keyword(model)
    dense, filled = engine.new_cache(prompt_tokens=PROMPT_LEN), engine.new_cache(prompt_tokens=PROMPT_LEN)
    with torch.no_grad():
        model(ids, **{keyword: dense})
        reference = model(ids, use_cache=True).past_key_values
        fill_prompt(
            filled,
            PROMPT_LEN,
            7,
            lambda i, s, n: (reference.layers[i].keys[:, :, s : s + n], reference.layers[i].values[:, :, s : s + n]),
        )
        loop = DecodeLoop(model, filled, keyword, SamplingSettings(), StopSettings(), 6, True, recorder=EagerRecorder())
        loop.start_after_fill(1, torch.device("cpu"), next_token=5)
        token = torch.tensor([[5]])
        for step in range(4):
            loop.run_step()
            expected = model(token, position_ids=torch.tensor([[PROMPT_LEN + step]]), **{keyword: dense}).logits
            token = expected[:, -1:].argmax(-1)
            assert int(loop.ids[0, 0]) == int(token[0, 0]), step

"""The engine's decode loop on CPU: the same static step transformers' generate drives, token for token.

`Engine.generate` prefills and runs the static step itself (on CUDA it replays a CUDA graph; here
it runs eagerly); `model.generate(past_key_values=engine.new_cache(...))` drives the same cache
step by step. Both must give the same tokens: at a small budget, with left padding, with the tail
ring wrapping, in both offload modes; a kept loop reused by a later call must equal a fresh one;
EOS, stop strings and sampling must behave as transformers' do.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from okv_testlib import PAD, PROMPT_LEN, cache_keyword, make_model, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime.decode.sampling import MIN_SAMPLING_TEMPERATURE, SamplingSettings, choose_tokens
from omnikv_runtime.layout import reserve_tokens

NEW = 24


def transformers_through_cache(engine, model, ids, mask, new_tokens=NEW, **kwargs):
    cache = engine.new_cache(reserve_tokens=reserve_tokens(ids.shape[1], new_tokens), prompt_tokens=ids.shape[1])
    with torch.no_grad():
        return model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=PAD,
            **{cache_keyword(model): cache},
            **kwargs,
        )


@pytest.mark.parametrize("offload", ["cpu", "none"])
@pytest.mark.parametrize("tail_tokens", [None, 5])
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_the_loop_equals_transformers_generate_through_the_cache(family, tail_tokens, offload):
    model = make_model(family)
    ids, mask = make_prompt(2)
    config = omni(8, offload={"device": offload}, prefill={"chunk_size": 16})
    config["omnikv"]["tail_tokens"] = tail_tokens
    engine = okv.initialize(model, config)
    loop = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD)
    assert engine.stats()["cuda_graph"] is False  # CPU: the same step, eagerly
    expected = transformers_through_cache(engine, model, ids, mask)
    assert torch.equal(loop, expected)
    dense = okv.initialize(model, omni(1.0)).generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD)
    assert not torch.equal(loop, dense)  # control: budget 8 of 40 tokens changes the output


def test_a_kept_loop_serves_the_next_call_like_a_fresh_engine():
    model = make_model("llama")
    config = omni(8, offload={"hot_cache_tokens": 12})
    config["omnikv"]["tail_tokens"] = 6
    engine = okv.initialize(model, config)
    for seed in (1, 2, 3):
        ids, mask = make_prompt(2, seed=seed)
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW - seed, pad_token_id=PAD)
        fresh = okv.initialize(model, config).generate(
            ids, attention_mask=mask, max_new_tokens=NEW - seed, pad_token_id=PAD
        )
        assert torch.equal(out, fresh)
        assert engine.stats()["selected_per_step"]["1"][-1] == 8
    assert len(engine._decode_loops) == 1  # one loop per batch size, reused (same shape each call)


def test_eos_stops_rows_and_pads_them_like_transformers():
    model = make_model("llama")
    ids, mask = make_prompt(2)
    engine = okv.initialize(model, omni(8))
    free = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD)
    eos = int(free[0, PROMPT_LEN + 3])  # a token row 0 emits early: it ends there
    loop = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD, eos_token_id=eos)
    expected = transformers_through_cache(engine, model, ids, mask, eos_token_id=eos)
    assert torch.equal(loop, expected)
    assert (loop[0, PROMPT_LEN + 4 :] == PAD).all() or loop.shape[1] == PROMPT_LEN + 4


class CharTokenizer:
    """A stand-in tokenizer: token t decodes to chr(97 + t % 26)."""

    def decode(self, ids, **kwargs) -> str:
        return "".join(chr(97 + int(t) % 26) for t in ids)


def test_stop_strings_end_a_row_after_the_token_that_completes_them():
    model = make_model("llama")
    ids, mask = make_prompt(1)
    engine = okv.initialize(model, omni(8))
    free = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD)
    text = CharTokenizer().decode(free[0, PROMPT_LEN:])
    stop = text[5:7]  # ends at new token 6 (or earlier, where the pair first occurs)
    end = text.index(stop) + 2
    out = engine.generate(ids, max_new_tokens=NEW, pad_token_id=PAD, stop_strings=[stop], tokenizer=CharTokenizer())
    assert torch.equal(out[0, : PROMPT_LEN + end], free[0, : PROMPT_LEN + end])
    assert out.shape[1] == PROMPT_LEN + end  # cut where the only row finished


def test_sampling_follows_the_warpers():
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    assert torch.equal(choose_tokens(logits, SamplingSettings()), logits.argmax(-1))
    assert torch.equal(choose_tokens(logits, SamplingSettings(True, 0.7, top_k=1)), logits.argmax(-1))
    top3 = logits.topk(3).indices
    draws = torch.stack([choose_tokens(logits, SamplingSettings(True, 1.0, top_k=3)) for _ in range(200)])
    assert all((draws[:, row, None] == top3[row]).any(-1).all() for row in range(3))
    assert len(set(draws[:, 0].tolist())) > 1  # it does sample
    nucleus = choose_tokens(torch.tensor([[5.0, 4.9, -9.0, -9.0]]), SamplingSettings(True, 1.0, top_p=0.5))
    assert nucleus.item() in (0, 1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingSettings(True, 1.0, top_p=1.5)


@pytest.mark.parametrize("temperature", [1e-38, 1e-40, 1e-45, 5e-324])
def test_a_tiny_temperature_is_greedy(temperature):
    """Dividing the logits by such a temperature overflows float32: the draw must not turn into NaN and token 0."""
    logits = torch.tensor([[0.5, -1.0, 2.0, 7.25, 7.0], [3.0, 1.0, 4.0, -2.0, 0.0]])
    chosen = choose_tokens(logits, SamplingSettings(True, temperature), torch.Generator().manual_seed(1))
    assert chosen.tolist() == [3, 2] == logits.argmax(-1).tolist()


def test_the_greedy_temperature_bound():
    """Below MIN_SAMPLING_TEMPERATURE the choice is greedy and draws nothing; at it, it samples (and draws)."""
    logits = torch.tensor([[0.5, -1.0, 2.0, 7.25, 7.0]])
    below = math.nextafter(MIN_SAMPLING_TEMPERATURE, 0.0)
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    assert choose_tokens(logits, SamplingSettings(True, below), generator).tolist() == [3]
    assert torch.equal(generator.get_state(), state)  # greedy: no random number drawn
    assert choose_tokens(logits, SamplingSettings(True, MIN_SAMPLING_TEMPERATURE), generator).tolist() == [3]
    assert not torch.equal(generator.get_state(), state)  # sampled, and at this temperature still the top token
    engine = okv.initialize(make_model("llama"), omni(8))
    ids, mask = make_prompt(1)
    greedy = engine.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)
    tiny = engine.generate(
        ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD, do_sample=True, temperature=1e-40
    )
    assert torch.equal(tiny, greedy)


def test_what_the_loop_cannot_run_goes_to_transformers_with_a_reason(caplog):
    model = make_model("llama")
    ids, mask = make_prompt(1)
    engine = okv.initialize(model, omni(8))
    with caplog.at_level(logging.INFO, logger="omnikv_runtime.engine"):
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=PAD, repetition_penalty=1.3)
    assert "repetition_penalty=1.3" in caplog.text
    assert engine.stats().get("cuda_graph") is None
    expected = transformers_through_cache(engine, model, ids, mask, new_tokens=6, repetition_penalty=1.3)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("offload", ["cpu", "none"])
def test_the_loop_builds_no_autograd_graph_outside_inference_mode(offload):
    """Benchmarks and schedulers drive the loop without `torch.inference_mode`; the model's weights
    still require grad. A step that saved tensors for backward would keep every weight it used alive
    until its logits go (under ZeRO-Inference: every layer's fetched weights on the GPU at once)."""
    from omnikv_runtime.decode.loop import DecodeLoop, StopSettings

    model = make_model("llama")
    engine = okv.initialize(model, omni(8, offload={"device": offload}))
    ids, mask = make_prompt(1)
    cache = engine.new_cache(reserve_tokens=reserve_tokens(ids.shape[1], 8), prompt_tokens=ids.shape[1])
    loop = DecodeLoop(model, cache, engine.cache_keyword, SamplingSettings(), StopSettings(), 8, use_graph=False)

    def tensors_saved_for_backward(run) -> int:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            run()
        return len(saved)

    assert torch.is_grad_enabled()
    assert tensors_saved_for_backward(lambda: loop.prefill(ids, mask, chunk_size=16)) == 0
    assert tensors_saved_for_backward(loop.run_step) == 0
    assert tensors_saved_for_backward(loop.run_step) == 0
    # the control: the same model, called directly with grad enabled, saves tensors for backward
    assert tensors_saved_for_backward(lambda: model(input_ids=ids[:, :4])) > 0

"""Engine.generate checks its arguments before anything runs and never substitutes a default for a
value it was given; one engine shared by threads gives each request its own tokens; a cache from
``engine.new_cache()`` handed to ``model.generate`` tells a one-token last prefill chunk from decode."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from okv_testlib import PAD, PROMPT_LEN, VOCAB, cache_keyword, greedy_generate, make_model, make_prompt, omni
from transformers import GenerationConfig

import omnikv_runtime as okv
from omnikv_runtime.engine.guards import EngineBusyError
from omnikv_runtime.errors import PromptError

NEW = 6


@pytest.fixture(scope="module")
def engine():
    return okv.initialize(make_model("llama"), omni(budget=12))


@pytest.fixture(scope="module")
def ids():
    return make_prompt(1)[0]


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda ids: ids.clone().index_fill_(1, torch.tensor([3]), -1), r"input_ids\[0, 3\] = -1 is outside"),
        (lambda ids: ids.clone().index_fill_(1, torch.tensor([5]), VOCAB), rf"input_ids\[0, 5\] = {VOCAB} is outside"),
        (lambda ids: ids.float(), "integer token ids, got dtype float32"),
        (lambda ids: ids.tolist()[0][:3] + [2.5], "integer token ids, got dtype float"),
        (lambda ids: ids.bool(), "integer token ids, got dtype bool"),
        (lambda ids: ids[None], r"1-D \[tokens\] or 2-D \[batch, tokens\], got shape \(1, 1, 40\)"),
        (lambda ids: [[1, 2, 3], [4, 5]], "lists of ints of equal length"),
        (lambda ids: ids[:0], "batch of 0"),
        (lambda ids: ids[:, :0], "the prompt is empty"),
    ],
)
def test_bad_ids_are_refused_before_anything_runs(engine, ids, bad, message, monkeypatch):
    monkeypatch.setattr(engine, "_generate", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(PromptError, match=message):
        engine.generate(bad(ids), max_new_tokens=NEW)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0"),
        ({"max_new_tokens": -3}, "max_new_tokens must be at least 1, got -3"),
        ({"max_new_tokens": 2.5}, r"whole number of tokens \(an int\), got 2.5 \(float\)"),
        ({"max_new_tokens": 4.0}, r"whole number of tokens \(an int\), got 4.0"),
        ({"max_new_tokens": "4"}, r"whole number of tokens \(an int\), got '4' \(str\)"),
        ({"max_new_tokens": True}, "boolean"),
        ({"max_length": PROMPT_LEN}, f"max_length={PROMPT_LEN} leaves no room after the prompt's {PROMPT_LEN}"),
        ({"max_length": 50.5}, "max_length must be a whole number"),
        ({"attention_mask": torch.ones(1, 7)}, r"attention_mask has shape \(1, 7\) but input_ids has shape \(1, 40\)"),
        ({"attention_mask": torch.full((1, PROMPT_LEN), 2)}, "only 0 .padding. and 1"),
        ({"attention_mask": torch.zeros(1, PROMPT_LEN)}, "row 0 of attention_mask masks every token"),
        ({"past_key_values": None}, "makes its own cache"),
    ],
)
def test_bad_lengths_and_masks_are_refused(engine, ids, kwargs, message, monkeypatch):
    monkeypatch.setattr(engine, "_generate", lambda *a, **k: pytest.fail("generation started"))
    with pytest.raises(PromptError, match=message):
        engine.generate(ids, **kwargs)


def test_lengths_are_honoured_never_replaced(engine, ids):
    default = engine.config.generation.max_new_tokens
    assert engine.generate(ids, max_new_tokens=np.int64(3)).shape[1] == PROMPT_LEN + 3
    assert engine.generate(ids, max_length=PROMPT_LEN + 5).shape[1] == PROMPT_LEN + 5
    # both: max_new_tokens wins, as in transformers
    assert engine.generate(ids, max_new_tokens=2, max_length=PROMPT_LEN + 9).shape[1] == PROMPT_LEN + 2
    config = GenerationConfig(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    assert engine.generate(ids, generation_config=config).shape[1] == PROMPT_LEN + 4
    assert default not in (2, 3, 4, 5)
    assert engine.generate(ids).shape[1] == PROMPT_LEN + default
    # plain lists of ints are ids too
    assert torch.equal(engine.generate(ids[0].tolist(), max_new_tokens=3), engine.generate(ids, max_new_tokens=3))


def test_return_dict_in_generate_returns_transformers_output(engine, ids):
    out = engine.generate(ids, max_new_tokens=NEW, return_dict_in_generate=True, output_scores=True)
    assert torch.equal(out.sequences, engine.generate(ids, max_new_tokens=NEW))
    assert len(out.scores) == NEW and out.scores[0].shape == (1, VOCAB)
    assert engine.stats()["new_tokens"] == NEW


def test_a_generation_config_gets_the_engines_options_without_deprecated_mixing(engine, ids, monkeypatch):
    """The fallback to transformers' generate puts the engine's options into a copy of the caller's config."""
    seen = []
    original = engine.model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine.model, "generate", spy)
    config = GenerationConfig(num_beams=2, do_sample=False, pad_token_id=PAD)
    out = engine.generate(ids, max_new_tokens=3, generation_config=config)
    assert out.shape == (1, PROMPT_LEN + 3)
    passed = seen[0]
    generation_args = set(passed) - {"input_ids", "attention_mask", "generation_config", cache_keyword(engine.model)}
    assert generation_args == set(), generation_args
    assert passed["generation_config"].max_new_tokens == 3 and passed["generation_config"].num_beams == 2
    assert passed["generation_config"].prefill_chunk_size == engine.config.prefill.chunk_size
    assert config.max_new_tokens is None and config.prefill_chunk_size is None  # the caller's object is untouched


def test_one_engine_from_two_threads_gives_each_request_its_tokens():
    """h2o keeps running scores per request: they live in each cache, and generate calls do not interleave."""
    model = make_model("llama")
    engine = okv.initialize(model, omni(budget=12, selector={"type": "h2o"}))
    prompts = [make_prompt(1, seed=seed)[0] for seed in (1, 2)]
    expected = [engine.generate(p, max_new_tokens=12) for p in prompts]
    assert not torch.equal(expected[0][:, PROMPT_LEN:], expected[1][:, PROMPT_LEN:])
    start = threading.Barrier(2)
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            start.wait()
            for _ in range(3):
                results[index].append(engine.generate(prompts[index], max_new_tokens=12))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for index in (0, 1):
        assert len(results[index]) == 3 and all(torch.equal(out, expected[index]) for out in results[index])


def test_caches_of_one_engine_serve_model_generate_on_two_threads():
    model = make_model("llama")
    engine = okv.initialize(model, omni(budget=12, selector={"type": "h2o"}))
    keyword = cache_keyword(model)
    prompts = [make_prompt(1, seed=seed)[0] for seed in (3, 4)]

    def run(prompt):
        with torch.no_grad():
            return model.generate(
                prompt, max_new_tokens=10, do_sample=False, pad_token_id=PAD, **{keyword: engine.new_cache()}
            )

    expected = [run(p) for p in prompts]
    results: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def work(index: int) -> None:
        start.wait()
        results[index] += [run(prompts[index]) for _ in range(3)]

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index in (0, 1):
        assert len(results[index]) == 3 and all(torch.equal(out, expected[index]) for out in results[index])


def test_generate_inside_generate_is_a_clear_error(engine, ids):
    class Nested:
        def __call__(self, input_ids, scores, **kwargs):
            engine.generate(ids, max_new_tokens=1)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    from transformers import StoppingCriteriaList

    with pytest.raises(EngineBusyError, match="from inside a running generate"):
        engine.generate(ids, max_new_tokens=2, stopping_criteria=StoppingCriteriaList([Nested()]))
    assert engine.generate(ids, max_new_tokens=2).shape[1] == PROMPT_LEN + 2  # the engine is free again


def test_new_cache_in_model_generate_tells_a_one_token_last_chunk_from_decode():
    """A prompt of 41 tokens in chunks of 8 ends with a one-token chunk: it is prefill, not a decode step."""
    model = make_model("llama")
    engine = okv.initialize(model, omni(budget=12))
    ids, mask = make_prompt(2, length=41)
    keyword = cache_keyword(model)

    def run(chunk: int | None, **cache_args):
        cache = engine.new_cache(**cache_args)
        return greedy_generate(model, ids, mask, NEW, prefill_chunk_size=chunk, **{keyword: cache}), cache

    told, told_cache = run(8, prompt_tokens=41)
    untold, cache = run(8)
    whole, _ = run(None)
    assert torch.equal(untold, told) and torch.equal(untold, whole)
    assert cache.prompt_tokens == 41 and len(cache.selected_log) == len(told_cache.selected_log) == NEW - 1
    # what went wrong before: the one-token chunk ran as a decode step over a 40-token context
    assert cache.context_len == told_cache.context_len == 41


def test_initialize_takes_a_model_name_or_path(tmp_path, monkeypatch):
    loaded = []

    def fake_load(name, **kwargs):
        loaded.append((name, kwargs["dtype"]))
        return make_model("llama"), "the tokenizer"

    monkeypatch.setattr("omnikv_runtime.models.load_model", fake_load)
    engine = okv.initialize("smollm2-135m", omni(budget=12))
    assert loaded == [("smollm2-135m", "float32")] and engine.tokenizer == "the tokenizer"
    engine = okv.initialize(tmp_path, omni(budget=12), tokenizer="mine")
    assert loaded[-1][0] == str(tmp_path) and engine.tokenizer == "mine"
    with pytest.raises(okv.UnsupportedModelError, match="expected a transformers model .*got dict"):
        okv.initialize({"not": "a model"}, omni(budget=12))


@pytest.mark.parametrize("eviction", ["lru", "lfu", "none"])
def test_policies_keep_no_request_state_on_themselves(eviction):
    """Every selection and eviction policy is unchanged by a request: what a request carries from step to
    step lives in its cache, so one policy object (and one engine) can serve requests side by side."""
    from omnikv_runtime.policies import SELECTION_POLICIES

    model = make_model("llama")
    ids, mask = make_prompt(2)
    for name in sorted(SELECTION_POLICIES):
        offload = {"hot_cache_tokens": 8, "eviction": {"type": eviction}}
        engine = okv.initialize(model, omni(budget=12, selector={"type": name}, offload=offload))
        before = (dict(vars(engine.policy)), dict(vars(engine.eviction)))
        engine.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)
        after = (vars(engine.policy), vars(engine.eviction))
        assert (before[0].keys(), before[1].keys()) == (after[0].keys(), after[1].keys()), name
        for was, now in zip(before, after):
            assert all(was[key] is now[key] or was[key] == now[key] for key in was), name

"""User errors surface as the runtime's own exception types with messages that say what to change."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from okv_testlib import PAD, PROMPT_LEN, make_model, make_prompt, omni
from transformers import GPT2Config, GPT2LMHeadModel

import omnikv_runtime as okv
from omnikv_runtime import policies, transfer

RUNTIME_DIRS = [Path(m.__file__).resolve().parent for m in (okv, policies, transfer)]


def _assert_raised_by_the_runtime(excinfo) -> None:
    """The error was raised on purpose by omnikv_runtime code, not from deep inside torch or transformers."""
    assert isinstance(excinfo.value, okv.OmniKVError)
    frames = [Path(str(entry.path)) for entry in excinfo.traceback]
    deep = [str(p) for p in frames if "site-packages" in p.parts and ("torch" in p.parts or "transformers" in p.parts)]
    assert not deep, deep
    raiser = frames[-1].resolve()
    assert any(d in raiser.parents for d in RUNTIME_DIRS), raiser
    assert excinfo.value.__cause__ is None or isinstance(excinfo.value.__cause__, okv.OmniKVError)


@pytest.fixture
def engine(tiny_llama):
    return okv.initialize(tiny_llama, omni(budget=8))


@pytest.mark.parametrize(
    "prompt", [torch.empty(1, 0, dtype=torch.long), torch.empty(2, 0, dtype=torch.long), [], [[]]], ids=str
)
def test_empty_prompt(engine, prompt):
    with pytest.raises(okv.PromptError) as excinfo:
        engine.generate(prompt, max_new_tokens=4)
    assert "empty" in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    _assert_raised_by_the_runtime(excinfo)


def test_prompt_over_the_models_context(engine):
    ids, mask = make_prompt(1)
    limit = engine.model.config.max_position_embeddings
    new_tokens = limit - PROMPT_LEN + 1
    with pytest.raises(okv.PromptError) as excinfo:
        engine.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=PAD)
    message = str(excinfo.value)
    assert str(PROMPT_LEN) in message and str(new_tokens) in message and str(limit) in message
    assert "max_position_embeddings" in message
    assert "shorten the prompt" in message and "lower max_new_tokens" in message
    _assert_raised_by_the_runtime(excinfo)
    assert engine.stats().get("decode_steps") is None  # rejected before any forward ran


def test_prompt_over_the_configured_max_context_len(tiny_llama):
    engine = okv.initialize(tiny_llama, omni(budget=8, model={"max_context_len": PROMPT_LEN + 4}))
    ids, mask = make_prompt(1)
    with pytest.raises(okv.PromptError) as excinfo:
        engine.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=PAD)
    assert "model.max_context_len" in str(excinfo.value)
    assert "lower max_new_tokens" in str(excinfo.value)
    _assert_raised_by_the_runtime(excinfo)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)  # exactly fits
    assert out.shape == (1, PROMPT_LEN + 4)


def test_unsupported_architecture():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_embd=64, n_layer=8, n_head=4, n_positions=128, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(config).eval()
    with pytest.raises(okv.UnsupportedModelError) as excinfo:
        okv.initialize(model, omni())
    message = str(excinfo.value)
    assert "gpt2" in message and "GPT2LMHeadModel" in message
    for family in okv.SUPPORTED_MODEL_TYPES:
        assert family in message
    _assert_raised_by_the_runtime(excinfo)
    assert model.config._attn_implementation != "omnikv"


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed")
def test_flash_attention_without_flash_attn():
    model = make_model("llama")
    # a model loaded for flash-attention 2 (transformers refuses to set it without flash_attn, so set it here)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.initialize(model, omni(model={"attn_implementation": "flash_attention_2"}))
    error = excinfo.value
    assert error.field == "model.attn_implementation"
    assert "'flash_attention_2'" in str(error) and "flash-attn is not installed" in str(error)
    assert "'sdpa' or 'eager'" in str(error)
    _assert_raised_by_the_runtime(excinfo)


def test_engine_generate_refuses_a_cache_argument(engine):
    ids, mask = make_prompt(1)
    with pytest.raises(ValueError, match="makes its own cache"):
        engine.generate(ids, attention_mask=mask, max_new_tokens=2, past_key_values=engine.new_cache())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_triton_transfer_without_cuda_is_a_config_error():
    model = make_model("llama")
    with pytest.raises(okv.ConfigError, match="offload.transfer"):
        okv.initialize(model, {"omnikv": {"filter_layers": [1, 4]}, "offload": {"transfer": "triton"}})

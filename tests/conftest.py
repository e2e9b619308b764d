"""Fixtures of the omnikv_runtime test suite (helpers live in okv_testlib.py next to this file)."""

from __future__ import annotations

import pytest
import torch
from okv_testlib import FAMILIES, make_model, make_prompt, spy_attention

# 2 cores shared with other work: one intra-op thread is several times faster for these tiny models
torch.set_num_threads(1)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """Each of the four supported model families."""
    return request.param


@pytest.fixture
def model_factory():
    """``model_factory(family="llama", seed=0, attn_implementation="sdpa", **config_overrides)``."""
    return make_model


@pytest.fixture
def prompt_factory():
    """``prompt_factory(batch=1, length=40, pad=7, seed=1) -> (ids, mask)``."""
    return make_prompt


@pytest.fixture
def tiny_llama():
    return make_model("llama")


@pytest.fixture(scope="session")
def bundled_session():
    """The bundled model (SmolLM2-135M-Instruct) and its tokenizer, loaded once for the whole run."""
    from omnikv_runtime.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def bundled(bundled_session):
    """``(model, tokenizer)``: the session's bundled model. Engines a test builds on it are detached when the
    test ends, so every test gets the model as transformers runs it."""
    from omnikv_runtime.engine.patches import detach_model

    model, tokenizer = bundled_session
    base = model.config._attn_implementation
    yield model, tokenizer
    detach_model(model, base)


@pytest.fixture
def attention_spy():
    """``attention_spy(hook=None, after=None) -> calls``: spy on the registered "omnikv" attention for the
    test's duration (see ``okv_testlib.spy_attention``)."""
    stack = []

    def install(hook=None, name: str = "omnikv", after=None):
        context = spy_attention(name, hook, after)
        calls = context.__enter__()
        stack.append(context)
        return calls

    yield install
    while stack:
        stack.pop().__exit__(None, None, None)


@pytest.fixture
def no_model(monkeypatch):
    """A command fails the test if it gets as far as loading a config (and a model)."""
    import omnikv_runtime.config

    def load_config(*args, **kwargs):
        raise AssertionError("the command went on to load the model")

    monkeypatch.setattr(omnikv_runtime.config, "load_config", load_config)

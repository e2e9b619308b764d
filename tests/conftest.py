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

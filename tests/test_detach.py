"""Detach: an engine gives its model back as transformers runs it (attention implementation, decoder layers'
forward, input preparation), by ``engine.detach()`` or at the end of ``with okv.attach(model, config)``."""

from __future__ import annotations

import pytest
import torch
from okv_testlib import PAD, dense_reference, greedy_generate, make_model, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime.engine.fused_layers import decoder_layers, install_fused_layers, remove_fused_layers


def _untouched(model) -> bool:
    """Nothing of the runtime is left on the model's instance."""
    layers = decoder_layers(model)
    return (
        "prepare_inputs_for_generation" not in vars(model)
        and not any("forward" in vars(layer) or "_omnikv_unfused_forward" in vars(layer) for layer in layers)
        and not model.config._attn_implementation.startswith("omnikv")
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_detach_gives_the_model_back(attn):
    model = make_model("llama", attn_implementation=attn)
    assert _untouched(model)
    engine = okv.initialize(model, omni(budget=8, generation={"fused_layers": True}))
    assert model.config._attn_implementation == ("omnikv" if attn == "sdpa" else "omnikv_eager")
    assert engine.fused_layers and all("_omnikv_unfused_forward" in vars(layer) for layer in decoder_layers(model))
    assert "prepare_inputs_for_generation" in vars(model)
    ids, mask = make_prompt(2)
    engine.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)
    engine.detach()
    assert _untouched(model) and model.config._attn_implementation == attn
    # the model generates exactly as a model the runtime never touched
    assert torch.equal(greedy_generate(model, ids, mask), dense_reference("llama", 2, attn_implementation=attn))
    engine.detach()  # twice: nothing happens
    with pytest.raises(okv.OmniKVError, match="detached"):
        engine.generate(ids, attention_mask=mask, max_new_tokens=2)
    with pytest.raises(okv.OmniKVError, match="detached"):
        engine.new_cache()


def test_attach_scopes_an_engine_to_a_block():
    model = make_model("qwen2")
    ids, mask = make_prompt(2)
    with okv.attach(model, omni(budget=1.0)) as engine:
        assert model.config._attn_implementation == "omnikv"
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD)
    assert _untouched(model) and engine.detached
    assert torch.equal(out, dense_reference("qwen2", 2, new_tokens=8))
    with pytest.raises(RuntimeError, match="inside"), okv.attach(model, omni(budget=8)):
        raise RuntimeError("inside")  # an error in the block detaches too
    assert _untouched(model)


def test_a_second_engine_after_detach_works_and_detaches_to_the_base():
    model = make_model("llama", attn_implementation="eager")
    okv.initialize(model, omni(budget=8))  # an engine left attached
    engine = okv.initialize(model, omni(budget=1.0))  # the base under the first one's "omnikv_eager"
    assert engine.base_attention == "eager"
    engine.detach()
    assert model.config._attn_implementation == "eager"


def test_remove_fused_layers_restores_the_layers_own_forward():
    model = make_model("llama")
    ids, mask = make_prompt(1)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    own = decoder_layers(model)[0].forward
    assert install_fused_layers(model) == 8 and decoder_layers(model)[0].forward != own
    assert remove_fused_layers(model) == 8 and remove_fused_layers(model) == 0
    assert all(vars(layer).get("forward") is None for layer in decoder_layers(model))
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, before)

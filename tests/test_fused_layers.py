"""The fused decoder layers on CPU (the Triton kernels run on the GPU in test_gpu_decode.py).

- The fused forward (torch ops on CPU) gives transformers' own logits and tokens bit for bit, at a
  small budget and with padding: it only regroups the layer's operations.
- It is inert unless the runtime's cache asks for it: plain forwards and other caches run
  transformers' forward, and layers that cannot be fused keep it.
- The three kernels equal their torch references in the Triton interpreter (a child process:
  the interpreter must be chosen before triton is imported; it truncates when it rounds to
  bfloat16, so the exact checks run in float32).
"""

from __future__ import annotations

import pytest
import torch
from okv_testlib import PAD, cache_keyword, greedy_generate, make_model, make_prompt, omni, run_in_triton_interpreter

import omnikv_runtime as okv
from omnikv_runtime.engine.fused_layers import install_fused_layers, why_not_fusable
from omnikv_runtime.layout import reserve_tokens


def _generate_through_cache(engine, model, ids, mask, new_tokens=16):
    cache = engine.new_cache(reserve_tokens=reserve_tokens(ids.shape[1], new_tokens), prompt_tokens=ids.shape[1])
    kwargs = {"output_scores": True, "return_dict_in_generate": True, cache_keyword(model): cache}
    out = greedy_generate(model, ids, mask, new_tokens, **kwargs)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("budget", [8, 1.0])
def test_fused_forward_equals_transformers_layers(budget):
    ids, mask = make_prompt(2)
    config = omni(budget, prefill={"chunk_size": 16})
    plain = okv.initialize(make_model("llama"), {**config, "generation": {"fused_layers": False}})
    fused_model = make_model("llama")
    fused = okv.initialize(fused_model, {**config, "generation": {"fused_layers": True}})
    assert fused.fused_layers and not plain.fused_layers
    calls = []
    original = fused_model.model.layers[3]._omnikv_unfused_forward
    fused_model.model.layers[3]._omnikv_unfused_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    expected_tokens, expected_scores = _generate_through_cache(plain, plain.model, ids, mask)
    tokens, scores = _generate_through_cache(fused, fused_model, ids, mask)
    assert calls == []  # every forward of the run took the fused path
    assert torch.equal(scores, expected_scores)
    assert torch.equal(tokens, expected_tokens)
    # the engine's own loop runs the fused layers too
    looped = fused.generate(ids, attention_mask=mask, max_new_tokens=16, pad_token_id=PAD)
    assert torch.equal(looped, expected_tokens)


def test_fused_layers_are_inert_without_the_runtime_cache():
    model = make_model("llama")
    okv.initialize(model, omni(8, generation={"fused_layers": True}))
    calls = []
    layer = model.model.layers[0]
    original = layer._omnikv_unfused_forward
    layer._omnikv_unfused_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    ids, _ = make_prompt(1)
    with torch.no_grad():
        model(ids)  # no cache
        model(ids, use_cache=True)  # transformers' own DynamicCache
    assert len(calls) == 2


def test_install_is_idempotent_and_skips_other_architectures(caplog):
    model = make_model("llama")
    assert install_fused_layers(model) == 8
    first = model.model.layers[0].forward
    assert install_fused_layers(model) == 8
    assert model.model.layers[0].forward == first  # not wrapped twice
    qwen3 = make_model("qwen3")
    assert install_fused_layers(qwen3) == 0
    assert "Qwen3DecoderLayer" in why_not_fusable(qwen3.model.layers[0])
    llama = make_model("llama")
    llama.model.layers[2].mlp.act_fn = torch.nn.GELU()
    assert "GELU" in why_not_fusable(llama.model.layers[2])
    assert install_fused_layers(llama) == 7


def test_fused_layers_config_auto_is_off_on_cpu():
    engine = okv.initialize(make_model("llama"), omni(8))
    assert engine.config.generation.fused_layers == "auto"
    assert engine.fused_layers is False
    assert engine.new_cache().fused_layers is False


KERNELS_IN_THE_INTERPRETER = r"""
import torch
import omnikv_runtime.kernels.layer_ops as ops

ops._use_triton = lambda tensor: True  # CPU tensors go to the kernels, which the interpreter runs
torch.manual_seed(0)
x = torch.randn(3, 5, 576)
w = torch.randn(576)
out = torch.full_like(x, float("nan"))
result = ops.rms_norm(x, w, 1e-5)
torch.testing.assert_close(result, ops.rms_norm_torch(x, w, 1e-5), rtol=1e-6, atol=1e-6)
assert not torch.equal(result, x)
# rotary: projections viewed by head (strided), a table broadcast over the batch; float32 is exact
q = torch.randn(2, 7, 9 * 64).view(2, 7, 9, 64)
k = torch.randn(2, 7, 3 * 64).view(2, 7, 3, 64)
cos, sin = torch.randn(1, 7, 64), torch.randn(1, 7, 64)
q_rot, k_rot = ops.rotary_embedding(q, k, cos, sin)
q_ref, k_ref = ops.rotary_embedding_torch(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
assert q_rot.shape == (2, 9, 7, 64) and k_rot.shape == (2, 3, 7, 64)
assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)
# a per-row table and odd head counts (padding of the head block)
cos, sin = torch.randn(2, 7, 64), torch.randn(2, 7, 64)
q_rot, k_rot = ops.rotary_embedding(q[:, :, :5], k[:, :, :1], cos, sin)
q_ref, k_ref = ops.rotary_embedding_torch(q[:, :, :5].transpose(1, 2), k[:, :, :1].transpose(1, 2), cos, sin)
assert torch.equal(q_rot, q_ref) and torch.equal(k_rot, k_ref)
gate, up = torch.randn(2, 3, 2500) * 4, torch.randn(2, 3, 2500)  # rows longer than one block
torch.testing.assert_close(ops.silu_mul(gate, up), ops.silu_mul_torch(gate, up), rtol=1e-6, atol=1e-6)
print("ok")
"""


def test_layer_kernels_in_the_interpreter():
    run_in_triton_interpreter(KERNELS_IN_THE_INTERPRETER)

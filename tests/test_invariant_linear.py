"""The batch-invariant linear (``generation.batch_invariant``) on CPU.

- Under Triton's interpreter (float32), a row's product has the same bits in a product of 1 to 20 rows, of 64
  and of 100, with the reduction in one range and in several, and equals torch's linear within rounding.
- How many ranges the reduction is cut into follows the weight's shape and the card, never the rows.
- The engine wires it: with ``generation.batch_invariant`` the LM head goes through it in decode steps (one
  token a row), and so does every projection of the fused layers where the grouped decode kernel does not run
  (off CUDA, as here; on CUDA the layers' projections take the grouped kernel, whose rows are invariant too),
  prefill chunks through torch's linear (on CPU the kernel falls back to torch's linear, so the tokens are
  those without it), and
  without fused layers the setting is refused, naming the field, with the model given back as it came.
The GPU test (bf16 on the card, Llama-3-8B's shapes) is in ``test_gpu_invariant_linear.py``.
"""

from __future__ import annotations

import pytest
import torch
from okv_testlib import make_model, make_prompt, omni, run_in_triton_interpreter

import omnikv_runtime as okv
from omnikv_runtime.engine import fused_layers
from omnikv_runtime.errors import ConfigError
from omnikv_runtime.kernels.invariant_linear import BLOCK_K, invariant_linear, reduction_splits

INTERPRETED = """
import torch
from omnikv_runtime.kernels.invariant_linear import invariant_linear_triton, reduction_splits

torch.manual_seed(0)
# (out, in, multiprocessors): one range and a partial column tile; four ranges; a reduction not a whole step
for columns, reduction, multiprocessors, splits in ((200, 300, 8, 1), (70, 1000, 64, 4), (130, 520, 1, 1)):
    assert reduction_splits(columns, reduction, multiprocessors) == splits
    weight = torch.randn(columns, reduction) * 0.05
    bias = torch.randn(columns)
    x = torch.randn(100, reduction)
    x[20:] = torch.randn(80, reduction) * 100  # other rows of other sizes: they must not move row 0
    for with_bias in (None, bias):
        alone = invariant_linear_triton(x[:1], weight, with_bias, multiprocessors)
        for rows in (*range(2, 21), 64, 100):
            together = invariant_linear_triton(x[:rows], weight, with_bias, multiprocessors)
            assert torch.equal(together[0], alone[0]), (columns, rows)
        reference = torch.nn.functional.linear(x[:20], weight, with_bias)
        torch.testing.assert_close(together[:20], reference, rtol=1e-4, atol=1e-4)
    three = invariant_linear_triton(x[:6].reshape(2, 3, reduction), weight, None, multiprocessors)
    assert three.shape == (2, 3, columns)
    reference = torch.nn.functional.linear(x[:6], weight)
    torch.testing.assert_close(three.reshape(6, columns), reference, rtol=1e-4, atol=1e-4)
print("ok")
"""


def test_rows_have_the_same_bits_in_any_batch_under_the_interpreter():
    run_in_triton_interpreter(INTERPRETED)


def test_the_reduction_is_cut_by_the_weight_and_the_card_only():
    # Llama-3-8B on an H100 (132 multiprocessors): q/o, k/v, gate/up, down, LM head
    shapes = {(4096, 4096): 8, (1024, 4096): 16, (14336, 4096): 2, (4096, 14336): 8, (128256, 4096): 1}
    assert {shape: reduction_splits(*shape, 132) for shape in shapes} == shapes
    assert reduction_splits(64, 2 * BLOCK_K, 1000) == 1  # a range keeps at least two steps
    assert reduction_splits(64, 4 * BLOCK_K, 1000) == 2


def test_off_cuda_it_is_torch_linear():
    weight, x, bias = torch.randn(7, 5), torch.randn(3, 5), torch.randn(7)
    assert torch.equal(invariant_linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias))


def test_the_engine_sends_every_projection_and_the_head_through_it(monkeypatch):
    calls: list[tuple[int, ...]] = []
    real = fused_layers.invariant_linear

    def recording(hidden, weight, bias=None):
        calls.append(tuple(weight.shape))
        tokens_a_row.add(hidden.shape[1])
        return real(hidden, weight, bias)

    tokens_a_row: set[int] = set()

    monkeypatch.setattr(fused_layers, "invariant_linear", recording)
    ids, mask = make_prompt(1)
    config = omni(8, prefill={"chunk_size": 16})
    plain = okv.initialize(make_model("llama"), {**config, "generation": {"fused_layers": True}})
    model = make_model("llama")
    engine = okv.initialize(model, {**config, "generation": {"fused_layers": True, "batch_invariant": True}})
    expected = plain.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert calls == []
    assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False), expected)
    layers, head = model.config.num_hidden_layers, tuple(model.lm_head.weight.shape)
    assert calls.count(head) >= 6  # the LM head of each step
    # q, k, v, o, gate, up, down of every layer in each of the 5 decode steps (the first token came from prefill)
    assert len(calls) - calls.count(head) == 5 * 7 * layers
    assert tokens_a_row == {1}  # decode steps (and the head at the prompt's last position); chunks: torch's linear
    engine.detach()
    calls.clear()
    model(ids)  # the model as transformers runs it: nothing goes through the kernel
    assert calls == [] and "forward" not in model.lm_head.__dict__


def test_without_fused_layers_it_is_refused_and_the_model_given_back():
    model = make_model("llama")
    with pytest.raises(ConfigError) as refused:
        okv.initialize(model, {**omni(8), "generation": {"fused_layers": False, "batch_invariant": True}})
    assert refused.value.field == "generation.batch_invariant" and refused.value.value is True
    assert "generation.fused_layers" in str(refused.value)
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(layer, "_omnikv_unfused_forward") for layer in model.model.layers)

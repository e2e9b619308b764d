"""GPU checks of the grouped decode projections (``pytest -m gpu`` on a CUDA machine).

- bf16 at Llama-3-8B's shapes: q/k/v in one launch and the gated gate/up launch are within bf16 rounding of a
  float32 reference, and row 0 has the same bits alone and among 2 to 16, 64 or 100 rows; the output and down
  launches with the residual added equal the product plus the residual as torch adds them, bit for bit.
- An engine's recorded decode step runs them (the fused layers call them) and gives the greedy tokens of the
  same engine with transformers' own layers (float32, where both are exact to float32 rounding).
"""

from __future__ import annotations

import pytest
import torch
from okv_testlib import cuda_llama, cuda_prompt

import omnikv_runtime as okv
from omnikv_runtime.engine import fused_layers
from omnikv_runtime.kernels.decode_linear import gated_linear, grouped_linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_llama3_8b_groups_in_bf16_are_close_to_float32_and_row_invariant():
    generator = torch.Generator(device="cuda").manual_seed(0)

    def weight(out, into):
        return torch.randn(out, into, device="cuda", dtype=torch.bfloat16, generator=generator) * 0.02

    qkv = [weight(4096, 4096), weight(1024, 4096), weight(1024, 4096)]
    gate, up = weight(14336, 4096), weight(14336, 4096)
    x = torch.randn(100, 4096, device="cuda", dtype=torch.bfloat16, generator=generator)
    alone = [*grouped_linear(x[:1], qkv), gated_linear(x[:1], gate, up)]
    for rows in (*range(2, 17), 64, 100):
        together = [*grouped_linear(x[:rows], qkv), gated_linear(x[:rows], gate, up)]
        assert all(torch.equal(t[0], a[0]) for t, a in zip(together, alone)), rows
    for out, w in zip(together[:3], qkv):
        torch.testing.assert_close(out.float(), x.float() @ w.float().T, rtol=1e-2, atol=1e-2)
    products = [(x.float() @ w.float().T).to(torch.bfloat16).float() for w in (gate, up)]
    reference = torch.nn.functional.silu(products[0]).to(torch.bfloat16).float() * products[1]
    torch.testing.assert_close(together[3].float(), reference, rtol=2e-2, atol=2e-2)
    residual = torch.randn(100, 4096, device="cuda", dtype=torch.bfloat16, generator=generator)
    output, down = weight(4096, 4096), weight(4096, 14336)
    for w, into in ((output, x), (down, together[3])):
        (plain,) = grouped_linear(into, [w])
        (added,) = grouped_linear(into, [w], residual=residual)
        assert torch.equal(added, residual + plain)  # bf16: rounded as the separate add rounds
        assert torch.equal(grouped_linear(into[:1], [w], residual=residual[:1])[0][0], added[0])


def test_an_engine_runs_them_in_its_recorded_step_with_transformers_tokens(monkeypatch):
    calls = []
    original = fused_layers.grouped_linear
    monkeypatch.setattr(fused_layers, "grouped_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids, mask = cuda_prompt(2, 300, pad=40)
    tokens = []
    for fused in (False, True):
        model = cuda_llama(initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
        config = {
            "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 64},
            "offload": {"device": "cpu"},
            "generation": {"fused_layers": fused},
        }
        engine = okv.initialize(model, config)
        tokens.append(engine.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False))
        assert engine.stats()["cuda_graph"] is True
        assert bool(calls) == fused
    assert torch.equal(tokens[0], tokens[1])

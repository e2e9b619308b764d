"""GPU checks of the batch-invariant linear (``pytest -m gpu`` on a CUDA machine).

- For each of Llama-3-8B's projection shapes in bf16, row 0 of a product of 2 to 16 rows, of 64 and of 100, has the
  bits of the row's product alone, and every element is within bf16 rounding of a float32 reference.
- An engine with ``generation.batch_invariant`` runs it inside its recorded decode step and gives the greedy
  tokens of the same engine without it (float32: the kernel keeps float32 products in float32).
"""

from __future__ import annotations

import pytest
import torch
from okv_testlib import cuda_llama, cuda_prompt

import omnikv_runtime as okv
from omnikv_runtime.kernels.invariant_linear import invariant_linear

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# (out, in): q and o, k and v, gate and up, down, the LM head
LLAMA3_8B_PROJECTIONS = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336), (128256, 4096)]


@pytest.mark.parametrize(("columns", "reduction"), LLAMA3_8B_PROJECTIONS)
def test_a_row_has_the_same_bits_at_every_batch_in_bf16(columns, reduction):
    generator = torch.Generator(device="cuda").manual_seed(columns)
    weight = torch.randn(columns, reduction, device="cuda", dtype=torch.bfloat16, generator=generator) * 0.02
    x = torch.randn(100, reduction, device="cuda", dtype=torch.bfloat16, generator=generator)
    alone = invariant_linear(x[:1], weight)
    for rows in (*range(2, 17), 64, 100):
        together = invariant_linear(x[:rows], weight)
        assert torch.equal(together[0], alone[0]), rows
    reference = x.float() @ weight.float().T
    torch.testing.assert_close(together.float(), reference, rtol=1e-2, atol=1e-2)


def test_an_engine_runs_it_in_its_recorded_step_with_the_tokens_it_gives_without():
    ids, mask = cuda_prompt(2, 300, pad=40)
    tokens = []
    for invariant in (False, True):
        model = cuda_llama(initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
        config = {
            "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 64},
            "offload": {"device": "cpu"},
            "generation": {"fused_layers": True, "batch_invariant": invariant},
        }
        engine = okv.initialize(model, config)
        tokens.append(engine.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False))
        assert engine.stats()["cuda_graph"] is True
    assert torch.equal(tokens[0], tokens[1])

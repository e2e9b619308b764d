"""GPU checks of the filter scores written by the decode attention (``pytest -m gpu`` on a CUDA machine).

- bf16 at Llama-3-8B's heads over 33K columns (a padding mask and a shorter row): the scores the attention
  kernel writes match the separate scoring kernel within float32 rounding, ``-inf`` exactly where hidden, and the
  attention output is the one it gives without scoring (bit for bit).
- An engine's recorded decode step uses them (the ``last`` policy is given them) and selects the same tokens,
  and generates the same tokens, as with the separate scoring pass (float32).
"""

from __future__ import annotations

import pytest
import torch
from okv_testlib import cuda_llama, cuda_prompt

import omnikv_runtime as okv
from omnikv_runtime.cache.selector import Selector
from omnikv_runtime.kernels import KVSource, decode_attention, max_head_logits
from omnikv_runtime.listeners import SelectionRecorder
from omnikv_runtime.policies.last import LastQueryPolicy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_scores_match_the_scoring_kernel_and_leave_the_attention_alone():
    generator = torch.Generator(device="cuda").manual_seed(0)
    batch, columns = 2, 33_000

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=generator)

    query = rand(batch, 32, 128)
    keys, values = rand(batch, 8, columns, 128).transpose(1, 2), rand(batch, 8, columns, 128).transpose(1, 2)
    length = torch.tensor([columns, 30_000], device="cuda")
    mask = torch.rand(batch, columns, device="cuda", generator=generator) > 0.05
    source = KVSource(keys, values, length=length, mask=mask)
    width = 32_000
    head_max = torch.full((batch, width), 7.0, device="cuda")  # poison
    scored = decode_attention(query, [source], 0.088, head_max=head_max)
    assert torch.equal(scored, decode_attention(query, [source], 0.088))
    valid = mask[:, :width] & (torch.arange(width, device="cuda")[None, :] < length[:, None])
    expected = max_head_logits(query, keys[:, :width], 0.088, valid=valid)
    assert torch.equal(torch.isinf(head_max), ~valid)
    torch.testing.assert_close(head_max, expected, rtol=1e-5, atol=1e-5)


def test_an_engine_uses_them_in_its_recorded_step_with_the_same_choices(monkeypatch):
    given: list[bool] = []
    real_scores = LastQueryPolicy.scores

    def spying(self, ctx):
        given.append(ctx.head_max_logits is not None)
        return real_scores(self, ctx)

    monkeypatch.setattr(LastQueryPolicy, "scores", spying)
    ids, mask = cuda_prompt(2, 300, pad=40)
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(Selector, "head_max_buffer", lambda self, query, width: None)
        given.clear()
        model = cuda_llama(initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
        config = {
            "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 64},
            "offload": {"device": "cpu"},
        }
        engine = okv.initialize(model, config)
        recorder = SelectionRecorder(contexts=False)
        engine.add_listener(recorder)
        tokens = engine.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
        assert engine.stats()["cuda_graph"] is True
        runs.append((tokens, [r.indices for r in recorder.records], list(given)))
    (fused_tokens, fused_picks, fused_given), (plain_tokens, plain_picks, plain_given) = runs
    assert fused_given and all(fused_given) and plain_given and not any(plain_given)
    assert len(fused_picks) == len(plain_picks) > 0
    assert all(torch.equal(a, b) for a, b in zip(fused_picks, plain_picks))
    assert torch.equal(fused_tokens, plain_tokens)

"""A filter layer's scores written by its decode attention (``head_max``), on CPU.

- Under Triton's interpreter, the split-K kernel writes, for each column of its first source, ``scale`` times the
  largest ``q·k`` of any query head: equal to the separate scoring function within float32 rounding, ``-inf``
  exactly where the column does not count (masked, past the row's length), every entry written over poison, for
  the whole source and for a prefix of it; the attention output is unchanged. The torch path writes the same.
- Bad buffers are refused with what is wrong.
- The engine wires it: where the selector hands out a buffer, the ``last`` policy reads the attention's scores
  instead of the keys (every decode step of every filter layer), and selects the same tokens as without; in a
  server's batch each slot reads its own columns, and each request gets the tokens it gets alone.
On CUDA the same runs inside the recorded step (``test_gpu_fused_filter_scores.py``).
"""

from __future__ import annotations

import threading

import pytest
import torch
from okv_testlib import make_model, make_prompt, omni, run_in_triton_interpreter

import omnikv_runtime as okv
from omnikv_runtime.cache.selector import Selector
from omnikv_runtime.kernels import KVSource, decode_attention
from omnikv_runtime.listeners import SelectionRecorder
from omnikv_runtime.policies.last import LastQueryPolicy
from omnikv_runtime.serve.requests import ServeRequest
from omnikv_runtime.serve.scheduler import Scheduler

INTERPRETED = """
import torch
from omnikv_runtime.kernels.decode_attention import KVSource, decode_attention_torch
from omnikv_runtime.kernels.decode_attention_triton import decode_attention_triton
from omnikv_runtime.kernels.head_scores import max_head_logits_torch

torch.manual_seed(0)
batch, q_heads, kv_heads, dim, columns = 2, 8, 2, 32, 700
query = torch.randn(batch, q_heads, dim)
keys = torch.randn(batch, kv_heads, columns, dim).transpose(1, 2)  # [batch, tokens, kv_heads, dim] views
values = torch.randn(batch, kv_heads, columns, dim).transpose(1, 2)
length = torch.tensor([650, 700])
mask = torch.rand(batch, columns) > 0.1
tail = KVSource(torch.randn(batch, 5, kv_heads, dim), torch.randn(batch, 5, kv_heads, dim))
sources = [KVSource(keys, values, length=length, mask=mask), tail]
scale = 0.17
for width in (columns, 600):
    head_max = torch.full((batch, width), 123.0)  # poison: every entry must be written
    out = decode_attention_triton(query, sources, scale, 8, None, head_max)
    torch.testing.assert_close(out, decode_attention_torch(query, sources, scale), rtol=1e-4, atol=1e-4)
    valid = mask[:, :width] & (torch.arange(width)[None, :] < length[:, None])
    expected = max_head_logits_torch(query, keys[:, :width], scale, valid=valid)
    assert torch.equal(torch.isinf(head_max), ~valid)
    torch.testing.assert_close(head_max, expected, rtol=1e-5, atol=1e-5)
    by_torch = torch.full((batch, width), 123.0)
    decode_attention_torch(query, sources, scale, by_torch)
    torch.testing.assert_close(by_torch, expected, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_the_kernel_writes_the_filter_scores_while_it_attends_under_the_interpreter():
    run_in_triton_interpreter(INTERPRETED)


def test_bad_score_buffers_are_refused():
    query = torch.randn(1, 4, 8)
    keys = torch.randn(1, 10, 2, 8)
    plain = KVSource(keys, keys)
    with pytest.raises(ValueError, match="float32"):
        decode_attention(query, [plain], 1.0, head_max=torch.empty(1, 10, dtype=torch.float16))
    with pytest.raises(ValueError, match="11 columns for a source of 10"):
        decode_attention(query, [plain], 1.0, head_max=torch.empty(1, 11))
    indexed = KVSource(keys, keys, index=torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot have an index"):
        decode_attention(query, [indexed], 1.0, head_max=torch.empty(1, 3))


def test_the_last_policy_reads_the_attentions_scores_and_selects_the_same(monkeypatch):
    ids, mask = make_prompt(2)
    given: list[bool] = []
    real_scores = LastQueryPolicy.scores

    def spying(self, ctx):
        given.append(ctx.head_max_logits is not None)
        return real_scores(self, ctx)

    monkeypatch.setattr(LastQueryPolicy, "scores", spying)
    runs = []
    for fused in (False, True):
        if fused:  # hand out buffers on the CPU too (the torch attention fills them)
            monkeypatch.setattr(
                Selector,
                "head_max_buffer",
                lambda self, query, width: torch.empty(query.shape[0], width, dtype=torch.float32),
            )
        given.clear()
        recorder = SelectionRecorder(contexts=False)
        engine = okv.initialize(make_model("llama"), omni(8, offload={"device": "cpu"}))
        engine.add_listener(recorder)
        tokens = engine.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        runs.append((tokens, [r.indices for r in recorder.records], list(given)))
    (plain_tokens, plain_picks, plain_given), (fused_tokens, fused_picks, fused_given) = runs
    assert plain_given and not any(plain_given)
    assert fused_given and all(fused_given)  # every decode step's filter layers
    assert len(fused_picks) == len(plain_picks) > 0
    assert all(torch.equal(a, b) for a, b in zip(plain_picks, fused_picks))
    assert torch.equal(plain_tokens, fused_tokens)


def test_a_servers_slots_each_read_their_own_columns_of_the_attentions_scores(monkeypatch):
    engine = okv.initialize(
        make_model("llama"), omni(0.2, offload={"device": "cpu"}, prefill={"chunk_size": 32}), tokenizer=_Tokenizer()
    )
    prompts = [make_prompt(1, length, 0, seed=20 + i)[0][0].tolist() for i, length in enumerate((150, 61, 97))]
    alone = [
        engine.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False)[0, len(ids) :].tolist()
        for ids in prompts
    ]
    given: list[bool] = []
    real_scores = LastQueryPolicy.scores

    def spying(self, ctx):
        given.append(ctx.head_max_logits is not None and ctx.head_max_logits.shape == ctx.valid.shape)
        return real_scores(self, ctx)

    monkeypatch.setattr(LastQueryPolicy, "scores", spying)
    monkeypatch.setattr(
        Selector, "head_max_buffer", lambda self, query, width: torch.empty(query.shape[0], width, dtype=torch.float32)
    )
    scheduler = Scheduler(engine, max_batch=2, max_queue=8, max_context=256, max_new_tokens=16)
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    finished = threading.Semaphore(0)

    def sink(i):
        def on_event(event):
            tokens[i].extend(event.token_ids)
            if event.finish_reason is not None:
                finished.release()

        return on_event

    scheduler.start()
    try:
        for i, ids in enumerate(prompts):
            scheduler.submit(ServeRequest(f"r{i}", tuple(ids), 10, temperature=0.0), sink(i))
        for _ in prompts:
            assert finished.acquire(timeout=120)
    finally:
        scheduler.shutdown()
    assert given and all(given)  # two slots, each request its own columns of the batch's buffer
    assert [tokens[i] for i in range(len(prompts))] == alone


class _Tokenizer:
    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)

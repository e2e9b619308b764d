"""Prefix reuse in the server: questions about one document against the same questions served without it.

Each answer (greedy tokens) must equal the answer of a server without prefix reuse and of ``Engine.generate``
alone, while a request whose prompt starts with stored blocks prefills only its suffix (counted chunk by chunk).
The store itself: LRU eviction under its byte budget, blocks an admission copies from this turn never evicted or
overwritten, a cancelled request leaving the blocks it shared intact, and refusals of a bad budget.
"""

from __future__ import annotations

import threading

import pytest
import torch
from okv_testlib import make_prompt
from test_serve_batching import Collector, make_engine

import omnikv_runtime as okv
from omnikv_runtime.serve.batch import PrefillJob
from omnikv_runtime.serve.prefix_cache import block_bytes
from omnikv_runtime.serve.requests import ServeRequest
from omnikv_runtime.serve.scheduler import Scheduler
from omnikv_runtime.serve.turns import TurnPlan

BLOCK = 16
NEW_TOKENS = 6


def document(length: int, seed: int) -> list[int]:
    return make_prompt(1, length, 0, seed=seed)[0][0].tolist()


def budget(engine, blocks: int) -> int:
    return blocks * sum(block_bytes(engine, BLOCK))


def poison(scheduler: Scheduler) -> None:
    """Overwrite every slot's dense buffers and host-tier rows with noise (finite: attention masks what is not a
    token), so that a request finds nothing of the last one's KV in its slot."""
    generator = torch.Generator().manual_seed(0)
    tiers = scheduler.batch.cache.tiers
    for layer in tiers.dense_layers:
        for buffer in (layer.key_buffer, layer.value_buffer):
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 3)
    for arena in tiers.arenas:
        if arena.quantized:  # codes 0..0x7e are finite in float8_e4m3fn
            arena.data.view(torch.uint8).copy_(torch.randint(0, 0x7E, arena.data.shape, generator=generator))
            arena.scales.fill_(0.5)
        else:
            arena.data.copy_(torch.randn(arena.data.shape, generator=generator) * 3)


def serve(scheduler: Scheduler, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """Each prompt's greedy tokens, the requests sent one after another (the slots poisoned before each)."""
    answers = []
    for i, ids in enumerate(prompts):
        poison(scheduler)
        collected = Collector(1)
        scheduler.submit(ServeRequest(f"q{i}", tuple(ids), new_tokens, temperature=0.0), collected.sink(0))
        collected.wait()
        assert collected.finish[0] == "length"
        answers.append(collected.tokens[0])
    return answers


def alone(engine, prompts: list[list[int]], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    outputs = [engine.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False) for ids in prompts]
    return [out[0, len(ids) :].tolist() for out, ids in zip(outputs, prompts, strict=True)]


@pytest.fixture
def prefilled(monkeypatch) -> list[tuple[PrefillJob, int, int]]:
    """``(prefill, prompt tokens, tokens run)`` of each prefill chunk that runs (see :func:`per_prefill`)."""
    chunks: list[tuple[PrefillJob, int, int]] = []
    advance = PrefillJob.advance

    def counting(job: PrefillJob):
        before = job.done_tokens
        logits = advance(job)
        chunks.append((job, job.prompt_tokens, job.done_tokens - before))
        return logits

    monkeypatch.setattr(PrefillJob, "advance", counting)
    return chunks


def per_prefill(chunks: list[tuple[PrefillJob, int, int]]) -> list[tuple[int, int]]:
    """``(prompt tokens, tokens prefilled)`` of each prefill, in the order they started."""
    totals: dict[int, list[int]] = {}
    for job, prompt, run in chunks:
        totals.setdefault(id(job), [prompt, 0])[1] += run  # the list holds each job: no id is reused
    return [tuple(total) for total in totals.values()]


@pytest.mark.parametrize(
    ("offload", "selector", "host_dtype"),
    [
        ("cpu", None, None),
        ("none", None, None),
        ("cpu", None, "float8_e4m3fn"),  # codes and scales stored and copied as they are
        ("cpu", {"type": "uniform", "window_size": 4}, None),  # the query window comes from the suffix
    ],
)
def test_questions_about_one_document_prefill_only_their_suffix(prefilled, offload, selector, host_dtype):
    engine = make_engine(offload, selector, host_dtype=host_dtype)
    doc = document(160, seed=3)  # 10 blocks
    questions = [doc + document(n, seed=20 + n) for n in (9, 17, 2, 30)]
    expected = alone(engine, questions)
    plain = Scheduler(engine, max_batch=2, max_context=256, max_new_tokens=16)
    plain.start()
    try:
        assert serve(plain, questions) == expected
    finally:
        plain.shutdown()
    assert per_prefill(prefilled) == [(len(q), len(q)) for q in questions]  # no reuse: every prompt in full
    prefilled.clear()

    scheduler = Scheduler(
        engine,
        max_batch=2,
        max_context=256,
        max_new_tokens=16,
        prefix_cache_bytes=budget(engine, 40),
        prefix_block_tokens=BLOCK,
    )
    scheduler.start()
    try:
        assert serve(scheduler, questions) == expected
    finally:
        scheduler.shutdown()
    keep = max(1, engine.selector.window_size)
    reused = [0] + [min(160, len(q) - keep) // BLOCK * BLOCK for q in questions[1:]]
    assert reused[1:] == [160, 160 if keep == 1 else 144, 160]  # a window of 4 queries: 4 tokens prefilled at least
    assert per_prefill(prefilled) == [(len(q), len(q) - r) for q, r in zip(questions, reused, strict=True)]
    metrics = scheduler.metrics()
    assert metrics["prefix_cache_hit_tokens_total"] == sum(reused)
    assert metrics["prefix_cache_lookup_tokens_total"] == sum(map(len, questions))
    stored = 10 + sum(len(q) // BLOCK - 10 for q in questions)  # the document's 10 blocks once, then each tail's
    assert metrics["prefix_cache_blocks"] == stored
    gpu, host = block_bytes(engine, BLOCK)
    assert (metrics["prefix_cache_gpu_bytes"], metrics["prefix_cache_host_bytes"]) == (stored * gpu, stored * host)
    assert (host > 0) == (offload == "cpu")

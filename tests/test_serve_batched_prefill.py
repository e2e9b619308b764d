"""Batched chunked prefill: a turn prefills chunks of several requests, within its token budget, in one forward.

The chunks are packed as one sequence (``omnikv_runtime.cache.packed.PackedPrefill``); each request's KV must
land in its own slot and its attention see only its own tokens, so every request gets the tokens
``Engine.generate`` gives its prompt alone, and its slot holds what its prefill alone leaves there.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from okv_testlib import make_model, make_prompt, omni
from test_serve_batching import Collector, PieceTokenizer, make_engine, prompts

import omnikv_runtime as okv
from omnikv_runtime.cache.packed import PackedPrefill
from omnikv_runtime.errors import ConfigError
from omnikv_runtime.serve import batch as batch_module
from omnikv_runtime.serve.batch import PrefillJob, SlotBatch
from omnikv_runtime.serve.requests import ServeRequest
from omnikv_runtime.serve.scheduler import Scheduler
from omnikv_runtime.serve.turns import TurnRunner

CHUNK = 32  # make_engine's prefill.chunk_size


class PrefillForwards:
    """The model's forwards with more than one token or through a packed cache: ``(tokens, packed)`` each."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen: list[tuple[int, bool]] = []
        self.after_first_packed: list = []  # callables run once, after the first packed forward
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        packed = isinstance(cache, PackedPrefill)
        if packed or kwargs["input_ids"].shape[1] > 1:
            self.seen.append((kwargs["input_ids"].shape[1], packed))
        if packed:
            while self.after_first_packed:
                self.after_first_packed.pop()()


def alone(engine, ids: list[int], count: int) -> list[int]:
    return engine.generate(torch.tensor([ids]), max_new_tokens=count, do_sample=False)[0, len(ids) :].tolist()


@pytest.mark.parametrize(
    ("offload", "selector", "hot"),
    [
        ("cpu", None, 0),
        ("none", None, 0),
        ("cpu", {"type": "uniform", "window_size": 4}, 8),  # query windows per request, a hot cache per slot
    ],
)
def test_requests_prefilled_together_get_the_tokens_they_get_alone(offload, selector, hot):
    engine = make_engine(offload, selector, hot=hot)
    new_tokens = [9, 12, 6, 10, 7]
    expected = [alone(engine, ids, count) for ids, count in zip(prompts(), new_tokens, strict=True)]
    scheduler = Scheduler(engine, max_batch=4, max_context=256, max_new_tokens=16, max_prefill_tokens=80)
    forwards = PrefillForwards(engine.model)
    collected = Collector(len(expected))
    try:
        for i, (ids, count) in enumerate(zip(prompts(), new_tokens, strict=True)):  # queued before the first turn
            scheduler.submit(ServeRequest(f"r{i}", tuple(ids), count, temperature=0.0), collected.sink(i))
        scheduler.start()
        collected.wait()
    finally:
        scheduler.shutdown()
        forwards.handle.remove()
    assert [collected.tokens[i] for i in range(len(expected))] == expected
    metrics = scheduler.metrics()
    assert metrics["prefill_tokens_total"] == sum(len(ids) for ids in prompts())
    assert metrics["prefill_forwards_total"] == len(forwards.seen)
    assert sum(packed for _, packed in forwards.seen) >= 3  # several requests' chunks ran packed
    assert all(tokens <= 80 for tokens, _ in forwards.seen)
    assert metrics["slots_free"] == 4 and metrics["kv_bytes"]["host_used"] == 0


def test_every_chunk_is_cut_where_generate_cuts_the_prompt_alone(monkeypatch):
    """Five requests queued together under a budget of two and a half chunks: every chunk the server runs starts at
    a multiple of the chunk size from its prompt's start and ends at the next one or at the prompt's end, so a
    request's prefill forwards are those of its prompt alone (in bf16 a chunk cut elsewhere rounds otherwise)."""
    engine = make_engine()
    turns: list[list[tuple[int, int, int]]] = []
    prefill = SlotBatch.prefill

    def recording(self, chunks):
        turns.append([(job.done_tokens, tokens, job.prompt_tokens) for job, tokens in chunks])
        return prefill(self, chunks)

    monkeypatch.setattr(SlotBatch, "prefill", recording)
    new_tokens = [5, 7, 4, 6, 3]
    expected = [alone(engine, ids, count) for ids, count in zip(prompts(), new_tokens, strict=True)]
    scheduler = Scheduler(engine, max_batch=4, max_context=256, max_new_tokens=16, max_prefill_tokens=80)
    collected = Collector(len(expected))
    try:
        for i, (ids, count) in enumerate(zip(prompts(), new_tokens, strict=True)):
            scheduler.submit(ServeRequest(f"r{i}", tuple(ids), count, temperature=0.0), collected.sink(i))
        scheduler.start()
        collected.wait()
    finally:
        scheduler.shutdown()
    assert [collected.tokens[i] for i in range(len(expected))] == expected
    chunks = [chunk for turn in turns for chunk in turn]
    assert sum(tokens for _, tokens, _ in chunks) == sum(len(ids) for ids in prompts())
    assert all(done % CHUNK == 0 and (tokens == CHUNK or done + tokens == length) for done, tokens, length in chunks)
    assert all(sum(tokens for _, tokens, _ in turn) <= 80 for turn in turns)
    assert any(len(turn) > 1 for turn in turns)  # still several requests a forward


def test_a_plan_takes_whole_chunks_and_cuts_only_the_first_to_a_small_budget():
    runner = TurnRunner(None, chunk_size=32)
    runner.jobs = {0: SimpleNamespace(done_tokens=40, remaining=100), 1: SimpleNamespace(done_tokens=0, remaining=10)}
    admit = [(2, list(range(70)))]  # 16 of its tokens reused: its first chunk is 16 more, to the chunk's end
    # slot 0 runs to the end of its chunk (24), slot 1 its whole prompt (10); slot 2's 16 do not fit the 6 left
    assert runner.plan_prefill([0, 1, 2], admit, 40, {2: 16}) == [(0, 24), (1, 10)]
    assert runner.plan_prefill([1, 0, 2], admit, 42, {2: 16}) == [(1, 10), (0, 24)]
    assert runner.plan_prefill([2, 1, 0], admit, 64, {2: 16}) == [(2, 16), (1, 10), (0, 24)]
    # a budget under a chunk: the first chunk is cut to it, and nothing else runs
    assert runner.plan_prefill([0, 1], [], 8) == [(0, 8)]
    assert runner.plan_prefill([2, 1], admit, 8) == [(2, 8)]  # admitted without reuse: from token 0


@pytest.mark.parametrize(
    ("family", "attention", "selector"),
    [
        ("llama", "sdpa", {"type": "uniform", "window_size": 4}),
        ("llama", "eager", None),
        ("qwen3", "sdpa", {"type": "uniform", "window_size": 4}),
    ],
)
def test_a_packed_prefill_leaves_each_slot_what_its_prefill_alone_leaves(family, attention, selector):
    """Two batches of two slots: one prefills two prompts one forward per chunk, the other in packed forwards of
    both requests' chunks (of other sizes, a one-token chunk among them); each slot's dense KV, host-tier rows,
    query windows and last logits must match."""
    config = omni(0.2, selector, offload={"device": "cpu"}, prefill={"chunk_size": 16})
    engine = okv.initialize(make_model(family, attn_implementation=attention), config, tokenizer=PieceTokenizer())
    first, second = (make_prompt(1, length, 0, seed=40 + length)[0][0].tolist() for length in (45, 30))
    solo, packed = (SlotBatch(engine, rows=2, capacity=64, new_tokens=8) for _ in range(2))
    solo_jobs = [PrefillJob(solo, 0, first, 16), PrefillJob(solo, 1, second, 16)]
    solo_logits = {}
    for job in solo_jobs:
        while (logits := job.advance()) is None:
            pass
        solo_logits[job.row] = logits
    jobs = [PrefillJob(packed, 0, first, 16), PrefillJob(packed, 1, second, 16)]
    packed_logits = {}
    for sizes in ((16, 13), (16, 16), (12, 1), (1, 0)):
        turn = [(job, size) for job, size in zip(jobs, sizes, strict=True) if size]
        packed_logits.update(packed.prefill(turn))
    assert packed.prefill_forwards == 4 and packed.prefill_tokens == 75
    for row in (0, 1):
        torch.testing.assert_close(packed_logits[row], solo_logits[row], rtol=1e-4, atol=1e-4)
    for mine, theirs in zip(packed.cache.tiers.dense_layers, solo.cache.tiers.dense_layers, strict=True):
        torch.testing.assert_close(mine.key_buffer, theirs.key_buffer, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mine.value_buffer, theirs.value_buffer, rtol=1e-4, atol=1e-5)
    for mine, theirs in zip(packed.cache.tiers.arenas, solo.cache.tiers.arenas, strict=True):
        for row, length in ((0, len(first)), (1, len(second))):  # [rows, tokens, layers, 2, kv heads, head dim]
            torch.testing.assert_close(mine.data[row, :length], theirs.data[row, :length], rtol=1e-4, atol=1e-5)
    for job, solo_job in zip(jobs, solo_jobs, strict=True):
        assert job.cache.get_seq_length() == solo_job.cache.get_seq_length() == job.prompt_tokens
        for mine, theirs in zip(job.cache.tiers.segments, solo_job.cache.tiers.segments, strict=True):
            assert mine.window.has_prefill == theirs.window.has_prefill == (selector is not None)
            if selector is not None:
                torch.testing.assert_close(mine.window._prefill[0], theirs.window._prefill[0], rtol=1e-4, atol=1e-5)
                assert torch.equal(mine.window._prefill[1], theirs.window._prefill[1])


def test_a_short_request_behind_a_long_one_gets_its_first_token_before_the_long_prefill_ends():
    engine = make_engine()
    long, short = prompts()[0], prompts()[1][:20]  # 150 and 20 tokens
    scheduler = Scheduler(engine, max_batch=2, max_context=256, max_new_tokens=16, max_prefill_tokens=2 * CHUNK)
    forwards = PrefillForwards(engine.model)
    firsts: list[str] = []
    collected = Collector(2)

    def sink(i: int, name: str):
        inner = collected.sink(i)

        def on_event(event) -> None:
            if collected.events[i] == 0:
                firsts.append(name)
            inner(event)

        return on_event

    try:
        scheduler.submit(ServeRequest("long", tuple(long), 5, temperature=0.0), sink(0, "long"))
        scheduler.submit(ServeRequest("short", tuple(short), 5, temperature=0.0), sink(1, "short"))
        scheduler.start()
        collected.wait()
    finally:
        scheduler.shutdown()
        forwards.handle.remove()
    assert firsts == ["short", "long"]
    # the first turn: the long prompt's first chunk and the whole short prompt, in one forward
    assert forwards.seen[0] == (CHUNK + 20, True)
    # then the long prompt alone, a chunk a turn (a request's chunk is at most prefill.chunk_size)
    assert forwards.seen[1:] == [(CHUNK, False)] * 3 + [(150 - 4 * CHUNK, False)]
    assert collected.tokens == {0: alone(engine, long, 5), 1: alone(engine, short, 5)}


def test_a_request_cancelled_mid_prefill_leaves_the_others_tokens_unchanged():
    engine = make_engine()
    ids = prompts()  # 150, 61, 97 tokens: cancelled after the first packed turn, the 61 is mid-prefill
    expected = {0: alone(engine, ids[0], 8), 2: alone(engine, ids[2], 6)}
    scheduler = Scheduler(engine, max_batch=3, max_context=256, max_new_tokens=16, max_prefill_tokens=3 * CHUNK)
    forwards = PrefillForwards(engine.model)
    collected = Collector(3)
    handles = {}
    try:
        for i, count in ((0, 8), (1, 8), (2, 6)):
            handles[i] = scheduler.submit(
                ServeRequest(f"r{i}", tuple(ids[i]), count, temperature=0.0), collected.sink(i)
            )
        forwards.after_first_packed.append(handles[1].cancel)
        scheduler.start()
        collected.wait()
    finally:
        scheduler.shutdown()
        forwards.handle.remove()
    assert collected.finish == {0: "length", 1: "cancelled", 2: "length"}
    assert collected.tokens[1] == []
    assert {i: collected.tokens[i] for i in (0, 2)} == expected
    assert forwards.seen[0] == (3 * CHUNK, True) and forwards.seen[1][0] == 2 * CHUNK  # the others go on
    assert scheduler.batch.cache.free_rows() == [0, 1, 2] and scheduler.turns.jobs == {}


@pytest.mark.parametrize("why", ["unchecked family", "batch invariance"])
def test_without_packing_each_chunk_runs_its_own_forward_in_the_same_turn(why, monkeypatch, caplog):
    if why == "unchecked family":
        reason = "a family packing was not checked"
        monkeypatch.setattr(batch_module, "packing_blocker", lambda model, invariant: reason)
        engine = make_engine()
    else:  # a chunk packed with another request's would run its projections at another shape than alone
        config = omni(0.2, offload={"device": "cpu"}, prefill={"chunk_size": CHUNK})
        config["generation"] = {"fused_layers": True, "batch_invariant": True}
        engine = okv.initialize(make_model("llama"), config, tokenizer=PieceTokenizer())
        reason = "generation.batch_invariant: each request's chunk runs alone, as generate runs it"
    with caplog.at_level(logging.INFO, logger="omnikv_runtime.serve.batch"):
        scheduler = Scheduler(engine, max_batch=2, max_context=256, max_new_tokens=16, max_prefill_tokens=2 * CHUNK)
    assert [r.message for r in caplog.records if "one forward each" in r.message] == [
        f"prefill: chunks of several requests run one forward each ({reason})"
    ]
    long, short = prompts()[0], prompts()[1][:20]
    forwards = PrefillForwards(engine.model)
    collected = Collector(2)
    try:
        scheduler.submit(ServeRequest("long", tuple(long), 4, temperature=0.0), collected.sink(0))
        scheduler.submit(ServeRequest("short", tuple(short), 4, temperature=0.0), collected.sink(1))
        scheduler.start()
        collected.wait()
    finally:
        scheduler.shutdown()
        forwards.handle.remove()
    assert forwards.seen[:2] == [(CHUNK, False), (20, False)]  # the first turn's two chunks, unpacked
    assert not any(packed for _, packed in forwards.seen)
    assert collected.tokens == {0: alone(engine, long, 4), 1: alone(engine, short, 4)}


@pytest.mark.parametrize("value", [0, -64, 2.5, True, "64"])
def test_a_bad_prefill_budget_is_refused_naming_the_setting(value):
    with pytest.raises(ConfigError) as refused:
        Scheduler(make_engine(), max_batch=1, max_context=64, max_prefill_tokens=value)
    assert refused.value.field == "max_prefill_tokens" and refused.value.value == value
    assert f"'max_prefill_tokens' = {value!r} is not allowed" in str(refused.value) and "at least 1" in str(
        refused.value
    )


def test_the_cli_refuses_a_bad_prefill_budget_and_takes_a_good_one(capsys):
    import argparse

    from omnikv_runtime.cli import serve as serve_cli

    parser = argparse.ArgumentParser()
    serve_cli.register(parser.add_subparsers())
    assert parser.parse_args(["serve", "--max-prefill-tokens", "512"]).max_prefill_tokens == 512
    assert parser.parse_args(["serve"]).max_prefill_tokens is None  # the scheduler's default: the chunk size
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--max-prefill-tokens", "0"])
    assert "--max-prefill-tokens: must be at least 1, got 0" in capsys.readouterr().err


def test_the_default_budget_is_one_chunk():
    engine = make_engine()
    scheduler = Scheduler(engine, max_batch=1, max_context=64)
    assert scheduler.max_prefill_tokens == CHUNK == engine.config.prefill.chunk_size


def test_each_request_of_a_packed_chunk_finds_its_sparse_layers_read_ahead(monkeypatch):
    """A chunk after the first reads each sparse layer's earlier tokens from the host tier, started ahead while
    the layers before it compute (the GPU transfer engine's prefetch). Each request's first update at layer 0
    drops the reads started before it; the packed prefill starts the earlier requests' reads again, so no
    request's read waits. Simulated here with the GPU engine's bookkeeping (the CPU engine reads at once)."""
    engine = make_engine()
    transfer = engine.transfer
    ahead: dict[tuple[int, int], tuple[int, int]] = {}
    found: list[bool] = []
    read_rows = transfer.read_rows

    def prefetch(arena, slot, stop, start=0, scales=None, dtype=None):
        ahead[(arena.data_ptr(), slot)] = (start, stop)

    def read(arena, slot, stop, start=0, scales=None, dtype=None):  # each layer's earlier tokens: one block here
        found.append(start == 0 and ahead.pop((arena.data_ptr(), slot), None) == (start, stop))
        return read_rows(arena, slot, stop, start, scales, dtype)

    monkeypatch.setattr(transfer, "prefetch_rows", prefetch)
    monkeypatch.setattr(transfer, "discard_prefetches", ahead.clear)
    monkeypatch.setattr(transfer, "read_rows", read)
    batch = SlotBatch(engine, rows=2, capacity=96, new_tokens=8)
    jobs = [PrefillJob(batch, row, ids, CHUNK) for row, ids in enumerate(prompts()[1:3])]
    batch.prefill([(job, 16) for job in jobs])
    assert found == []  # first chunks: nothing earlier to read
    batch.prefill([(job, 16) for job in jobs])
    sparse = len(engine.plan.sparse_layers)
    assert sparse > 0 and found == [True] * (2 * sparse)

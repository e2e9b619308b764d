"""Prefix reuse in the server: questions about one document against the same questions served without it.

Each answer (greedy tokens) must equal the answer of a server without prefix reuse and of ``Engine.generate``
alone, while a request whose prompt starts with stored blocks prefills only its suffix (counted chunk by chunk).
The store itself: LRU eviction under its byte budget, blocks an admission copies from this turn never evicted or
overwritten, a cancelled request leaving the blocks it shared intact, and refusals of a bad budget.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from okv_testlib import make_prompt
from serve_testlib import parse_exposition
from test_serve_batching import Collector, make_engine

import omnikv_runtime as okv
from omnikv_runtime.serve.batch import PrefillJob
from omnikv_runtime.serve.metrics import render_metrics
from omnikv_runtime.serve.prefix_cache import PrefixCache, block_bytes
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
    token), so that a request finds nothing of the last one's KV in its slot (and the prefix cache, told, copies
    every block it reuses from its pools)."""
    if scheduler.prefixes is not None:
        scheduler.prefixes.forget()
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


def prefix_scheduler(engine, slots: int, blocks: int) -> Scheduler:
    """A scheduler of ``slots`` slots of 256 tokens with a prefix cache of ``blocks`` blocks of ``BLOCK`` tokens."""
    return Scheduler(
        engine,
        max_batch=slots,
        max_context=256,
        max_new_tokens=16,
        prefix_cache_bytes=budget(engine, blocks),
        prefix_block_tokens=BLOCK,
    )


def serve(
    scheduler: Scheduler, prompts: list[list[int]], new_tokens: int = NEW_TOKENS, poisoned: bool = True
) -> list[list[int]]:
    """Each prompt's greedy tokens, the requests sent one after another (the slots poisoned before each, unless
    ``poisoned`` is False: then a slot still holds the last request's KV)."""
    answers = []
    for i, ids in enumerate(prompts):
        if poisoned:
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


def same_bits(pool: torch.Tensor, before: torch.Tensor) -> bool:
    """Whether ``pool`` holds the bits it held: the host pools are allocated uninitialised, and their unused blocks
    may hold NaN patterns, which ``torch.equal`` never finds equal."""
    return torch.equal(pool.view(torch.uint8), before.view(torch.uint8))


@pytest.fixture
def prefilled(monkeypatch) -> list[tuple[PrefillJob, int, int]]:
    """``(prefill, prompt tokens, tokens run)`` of each prefill chunk that runs (see :func:`per_prefill`)."""
    chunks: list[tuple[PrefillJob, int, int]] = []
    ran = PrefillJob.ran  # every prefill path (a chunk alone, or packed with others) reports its tokens here

    def counting(job: PrefillJob, tokens: int) -> bool:
        chunks.append((job, job.prompt_tokens, tokens))
        return ran(job, tokens)

    monkeypatch.setattr(PrefillJob, "ran", counting)
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
def test_questions_about_one_document_prefill_only_their_suffix(prefilled, caplog, offload, selector, host_dtype):
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

    scheduler = prefix_scheduler(engine, 2, 40)
    scheduler.start()
    try:
        with caplog.at_level(logging.INFO, logger="omnikv_runtime.serve.scheduler"):
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
    prefixes = scheduler.prefixes
    pools = [prefixes.dense, *prefixes.rows, *prefixes.scales]
    assert sum(pool.numel() * pool.element_size() for pool in pools if pool is not None) == 40 * (gpu + host)
    logged = [r.getMessage() for r in caplog.records if r.name == "omnikv_runtime.serve.scheduler"]
    for i, (q, r) in enumerate(zip(questions, reused, strict=True)):
        assert any(line.startswith(f"request q{i}: {len(q)} prompt tokens ({r} reused),") for line in logged[-8:])
    samples = parse_exposition(render_metrics(metrics))
    assert samples["omnikv_prefix_cache_hit_tokens_total"] == sum(reused)
    assert samples["omnikv_prefix_cache_host_bytes"] == stored * host


def test_blocks_are_evicted_least_recently_used_first_under_the_budget():
    engine = make_engine()
    docs = [document(96, seed=40 + i) for i in range(3)]  # 6 blocks each
    ask = [doc + document(5, seed=50 + i) for i, doc in enumerate(docs)]
    again = [doc + document(7, seed=60 + i) for i, doc in enumerate(docs)]
    scheduler = Scheduler(
        engine,
        max_batch=2,
        max_context=256,
        max_new_tokens=16,
        prefix_cache_bytes=budget(engine, 12) + 1,
        prefix_block_tokens=BLOCK,
    )
    prefixes = scheduler.prefixes
    assert prefixes.capacity == 12
    scheduler.start()
    try:
        serve(scheduler, [ask[0], ask[1]])  # full: both documents
        assert (
            prefixes.match(again[0]),
            prefixes.match(again[1]),
            scheduler.metrics()["prefix_cache_evictions_total"],
        ) == (96, 96, 0)
        first = serve(scheduler, [again[0]])  # document 0 is the most recent now
        answers = serve(scheduler, [ask[2], again[2]])  # document 2 evicts document 1, not 0 ...
        assert [prefixes.match(again[i]) for i in range(3)] == [96, 0, 96]
        assert [prefixes._blocks[key].index for key, _, _ in prefixes.keys(docs[2])] == [11, 10, 9, 8, 7, 6]
        answers += serve(scheduler, [again[0], again[1]])  # ... in document 1's places, the last first
    finally:
        scheduler.shutdown()
    assert first + answers == alone(engine, [again[0], ask[2], again[2], again[0], again[1]])
    metrics = scheduler.metrics()
    assert metrics["prefix_cache_evictions_total"] == 6 + 6  # document 1's blocks, then (asked again) document 2's
    assert metrics["prefix_cache_hit_tokens_total"] == 96 * 3  # document 0 twice, 2 once; 1 after its eviction: none
    assert metrics["prefix_cache_blocks"] == 12
    assert metrics["prefix_cache_host_bytes"] == 12 * block_bytes(engine, BLOCK)[1]


def test_a_block_an_admission_copies_from_is_not_evicted_in_that_turn():
    engine = make_engine()
    scheduler = prefix_scheduler(engine, 2, 6)
    batch, prefixes = scheduler.batch, scheduler.prefixes
    doc, other = document(96, seed=70), document(100, seed=71)

    def prefill(row: int, ids: list[int], reused: int = 0) -> PrefillJob:
        job = PrefillJob(batch, row, ids, scheduler.chunk_size, prefixes, reused)
        while job.advance() is None:
            pass
        return job

    with torch.inference_mode():
        prefixes.store(prefill(0, doc + [5]).cache, doc + [5], 0)  # the store is full: the document's 6 blocks
        held = prefixes.dense.clone(), [rows.clone() for rows in prefixes.rows]
        prefixes.begin_turn()
        question = doc + [7, 8]
        job = PrefillJob(batch, 1, question, scheduler.chunk_size, prefixes, prefixes.match(question))
        assert job.done_tokens == 96
        done = prefill(0, other)  # the same turn: its prompt's blocks find no room
        assert prefixes.store(done.cache, other, 0) == 0
        assert torch.equal(prefixes.dense, held[0]) and all(map(same_bits, prefixes.rows, held[1]))
        assert prefixes.match(question) == 96
        prefixes.begin_turn()  # the next turn: the document's blocks may go
        assert prefixes.store(done.cache, other, 0) == 6
        assert prefixes.match(question) == 0 and prefixes.match(other + [1]) == 96
        assert prefixes.counts["evictions"] == 6


def test_a_cancelled_request_leaves_the_blocks_it_shared_for_the_others(monkeypatch):
    engine = make_engine()
    doc = document(96, seed=80)
    first, cancelled, later = doc + document(9, seed=81), doc + document(70, seed=82), doc + document(12, seed=83)
    scheduler = prefix_scheduler(engine, 2, 40)
    prefixes = scheduler.prefixes
    handles, chunks_run = [], []
    advance = PrefillJob.advance

    def cancel_after_one_chunk(job: PrefillJob, tokens: int | None = None):
        logits = advance(job, tokens)
        if job.prompt_ids == cancelled:
            chunks_run.append((job.reused, job.done_tokens))
            handles[0].cancel()  # its prefill has copied the prefix and run one chunk of its 70 suffix tokens
        return logits

    scheduler.start()
    try:
        answers = serve(scheduler, [first])
        held = len(prefixes._blocks), prefixes.dense.clone(), [rows.clone() for rows in prefixes.rows]
        monkeypatch.setattr(PrefillJob, "advance", cancel_after_one_chunk)
        ended = Collector(1)
        handles.append(scheduler.submit(ServeRequest("gone", tuple(cancelled), 8, temperature=0.0), ended.sink(0)))
        ended.wait()
        assert ended.finish[0] == "cancelled" and ended.tokens[0] == []
        assert chunks_run == [(96, 96 + 32)]
        assert len(prefixes._blocks) == held[0] and torch.equal(prefixes.dense, held[1])
        assert all(map(same_bits, prefixes.rows, held[2]))
        answers += serve(scheduler, [later])
    finally:
        scheduler.shutdown()
    assert answers == alone(engine, [first, later])
    assert scheduler.metrics()["prefix_cache_hit_tokens_total"] == 96 + 96


@pytest.mark.parametrize("value", [-1, 1.5, "1000", True])
def test_a_bad_budget_is_refused_naming_the_field(value):
    with pytest.raises(okv.ConfigError, match=r"prefix_cache_bytes.*whole number of bytes, at least 0"):
        Scheduler(make_engine(), max_batch=1, max_context=64, prefix_cache_bytes=value)


def test_a_budget_below_one_block_and_a_bad_block_size_are_refused():
    engine = make_engine()
    one = sum(block_bytes(engine, BLOCK))
    with pytest.raises(okv.ConfigError, match=rf"prefix_cache_bytes.*0 \(no prefix reuse\) or at least {one} bytes"):
        Scheduler(engine, max_batch=1, max_context=64, prefix_cache_bytes=one - 1, prefix_block_tokens=BLOCK)
    with pytest.raises(okv.ConfigError, match=r"prefix_block_tokens.*at least 1"):
        Scheduler(engine, max_batch=1, max_context=64, prefix_cache_bytes=one, prefix_block_tokens=0)


def test_the_reused_tokens_travel_in_the_turn_plan():
    plan = TurnPlan(
        drop=[1], admit=[(1, [5, 6, 7]), (0, list(range(3, 300)))], prefill=[(1, 3), (0, 41)], reuse={0: 256}
    )
    assert TurnPlan.decode(plan.encode()) == plan
    assert TurnPlan.decode(TurnPlan(admit=[(2, [9])]).encode()).reuse == {}


@pytest.mark.parametrize(("value", "said"), [("-1", "must be at least 0"), ("1.5", "expected a whole number of bytes")])
def test_the_command_refuses_a_bad_budget_naming_the_option(capsys, value, said):
    from omnikv_runtime import cli

    with pytest.raises(SystemExit) as refused:
        cli.main(["serve", "--prefix-cache-bytes", value])
    assert refused.value.code == 2
    assert f"argument --prefix-cache-bytes: {said}" in capsys.readouterr().err


BENCHMARK = ["--model", "tiny", "--context", "64", "--questions", "3", "--question-tokens", "5", "--max-tokens", "2"]
BENCHMARK += ["--block-tokens", "16", "--threads", "1"]


def test_the_benchmark_runs_small_and_notices_a_wrong_answer(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import serve_prefix

    threads = torch.get_num_threads()
    try:
        assert serve_prefix.main([*BENCHMARK, "--out", str(tmp_path / "prefix.json")]) == 0
        report = json.loads((tmp_path / "prefix.json").read_text())
        assert [row["reused_tokens"] for row in report["questions"]] == [0, 64, 64]
        assert report["answers_equal_baseline"] and report["later_vs_first_ttft"] > 0
        assert "questions 2..3 vs the first" in capsys.readouterr().err
        load = PrefixCache.load

        def zeroed(self, cache, ids, tokens):  # the copied prefix loses its values: the answers change
            load(self, cache, ids, tokens)
            for layer in cache.tiers.dense_layers:
                layer.value_buffer.zero_()

        monkeypatch.setattr(PrefixCache, "load", zeroed)
        assert serve_prefix.main(BENCHMARK) == 1
        assert not json.loads(capsys.readouterr().out)["answers_equal_baseline"]
    finally:
        torch.set_num_threads(threads)


def test_the_budget_is_counted_where_the_slots_are_checked(monkeypatch):
    import psutil

    from omnikv_runtime.geometry import ModelGeometry
    from omnikv_runtime.planner import fit

    engine = make_engine()
    geometry = ModelGeometry.from_model(engine.model)
    slots = 2 * (64 + 1 + 16) * geometry.num_layers * geometry.kv_row_bytes(4)  # what the CPU check counts
    room = psutil.virtual_memory()._replace(available=int((slots + budget(engine, 10)) / 0.9) + 1)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: room)
    Scheduler(engine, max_batch=2, max_context=64, max_new_tokens=16, prefix_cache_bytes=budget(engine, 10))
    with pytest.raises(okv.ConfigError, match=r"prefix cache of .* GiB.*or --prefix-cache-bytes"):
        Scheduler(engine, max_batch=2, max_context=64, max_new_tokens=16, prefix_cache_bytes=budget(engine, 12))
    # on CUDA the planner's GPU and host needs each grow by their part of the budget
    monkeypatch.setattr(fit, "available_memory", lambda device: (2**40, 2**40))
    plan = fit.check_run(geometry, engine.config, torch.device("cuda"), 2, 48, 16)
    needed = plan.gpu - plan.weights
    monkeypatch.setattr(fit, "available_memory", lambda device: (int(needed / 0.95) + 2**20, 2**40))
    fit.check_run(geometry, engine.config, torch.device("cuda"), 2, 48, 16, reserved=(0, 2**30))
    with pytest.raises(okv.PromptError, match="GPU needs"):
        fit.check_run(geometry, engine.config, torch.device("cuda"), 2, 48, 16, reserved=(2**21, 0))
    monkeypatch.setattr(fit, "available_memory", lambda device: (2**40, plan.host + 2**20))
    with pytest.raises(okv.PromptError, match="host needs"):
        fit.check_run(geometry, engine.config, torch.device("cuda"), 2, 48, 16, reserved=(0, 2**21))


def copies_into_slots(monkeypatch) -> list[int]:
    """Blocks each admission's load copies from the pools into its slot (0: everything it reused was in place)."""
    copied: list[int] = []
    copy = PrefixCache._copy

    def counting(self, cache, pairs, into_slot):
        if into_slot:
            copied.append(len(pairs))
        return copy(self, cache, pairs, into_slot)

    monkeypatch.setattr(PrefixCache, "_copy", counting)
    return copied


@pytest.mark.parametrize(("offload", "host_dtype"), [("cpu", None), ("none", None), ("cpu", "float8_e4m3fn")])
def test_questions_one_after_another_reuse_the_document_where_their_slot_holds_it(monkeypatch, offload, host_dtype):
    """Nothing overwrites a slot between requests: the next question about the document reuses its KV in place,
    with no copy from the pools, and every answer equals ``generate``'s."""
    engine = make_engine(offload, host_dtype=host_dtype)
    doc = document(160, seed=4)  # 10 blocks
    questions = [doc + document(n, seed=40 + n) for n in (9, 17, 2, 30)]
    copied = copies_into_slots(monkeypatch)
    scheduler = prefix_scheduler(engine, 2, 40)
    scheduler.start()
    try:
        answers = serve(scheduler, questions, poisoned=False)
        metrics = scheduler.metrics()
    finally:
        scheduler.shutdown()
    assert answers == alone(engine, questions)
    assert metrics["prefix_cache_hit_tokens_total"] == metrics["prefix_cache_in_place_tokens_total"] == 3 * 160
    assert copied == [0, 0, 0]  # the three reusing admissions copied no block


def test_a_slot_keeps_its_prefix_after_the_pools_evict_it_until_another_prompt_overwrites_it(monkeypatch):
    """Pools of 6 blocks, two slots: document A's question goes to slot 0, B's to the empty slot 1 (A's prefix
    stays in slot 0), and B's blocks evict A's from the pools; A's next question still reuses A in place. With
    one slot, B overwrites A: A's next question reuses nothing. Every answer equals ``generate``'s."""
    engine = make_engine()
    doc_a, doc_b = document(96, seed=90), document(96, seed=91)
    asked = [doc_a + [3, 4, 5], doc_b + [6, 7], doc_a + [8, 9, 10, 11]]
    copied = copies_into_slots(monkeypatch)
    for slots, reused in ((2, [0, 0, 96]), (1, [0, 0, 0])):
        scheduler = prefix_scheduler(engine, slots, 6)
        scheduler.start()
        try:
            answers, seen = [], []
            for ids in asked:
                before = scheduler.metrics()["prefix_cache_in_place_tokens_total"]
                answers += serve(scheduler, [ids], poisoned=False)
                seen.append(scheduler.metrics()["prefix_cache_in_place_tokens_total"] - before)
            evictions = scheduler.metrics()["prefix_cache_evictions_total"]
        finally:
            scheduler.shutdown()
        assert answers == alone(engine, asked) and seen == reused and evictions >= 6
    assert not any(copied)  # A's blocks were gone from the pools: nothing could be copied


def test_waves_of_questions_about_several_documents_answer_as_generate_does(monkeypatch):
    """Three slots, pools smaller than the documents together, three waves of requests about four documents (each
    wave submitted at once, one request of the second wave cancelled after one prefill chunk): slots are reused in
    place, copied into from the pools and overwritten in every order, and each completed answer equals
    ``generate``'s."""
    engine = make_engine()
    docs = [document(64 + 16 * i, seed=100 + i) for i in range(4)]
    waves = []
    for wave, picks in enumerate(([0, 1, 0, 2], [1, 1, 3, 0], [2, 0, 1, 3])):
        waves.append([docs[d] + document(3 + 5 * wave + d, seed=200 + 10 * wave + d) for d in picks])
    expected = [alone(engine, wave) for wave in waves]
    scheduler = prefix_scheduler(engine, 3, 10)
    advance, handles, victim = PrefillJob.advance, [], waves[1][2]

    def cancel_one(job: PrefillJob, tokens: int | None = None):
        logits = advance(job, tokens)
        if job.prompt_ids == victim and handles:
            handles.pop().cancel()
        return logits

    monkeypatch.setattr(PrefillJob, "advance", cancel_one)
    scheduler.start()
    try:
        results = []
        for number, wave in enumerate(waves):
            collected = Collector(len(wave))
            for i, ids in enumerate(wave):
                handle = scheduler.submit(
                    ServeRequest(f"w{number}q{i}", tuple(ids), NEW_TOKENS, temperature=0.0), collected.sink(i)
                )
                if number == 1 and i == 2:
                    handles.append(handle)
            collected.wait()
            results.append(collected)
        metrics = scheduler.metrics()
    finally:
        scheduler.shutdown()
    for number, (collected, answers) in enumerate(zip(results, expected, strict=True)):
        for i, answer in enumerate(answers):
            if number == 1 and i == 2:
                assert collected.finish[i] == "cancelled"
            else:
                assert collected.finish[i] == "length" and collected.tokens[i] == answer, (number, i)
    assert metrics["prefix_cache_in_place_tokens_total"] > 0 and metrics["prefix_cache_evictions_total"] > 0
    assert metrics["prefix_cache_hit_tokens_total"] > metrics["prefix_cache_in_place_tokens_total"]

"""Continuous batching (the server's scheduler and slot cache) against each request served alone.

A request's greedy tokens must not depend on what else runs in the batch: here requests of
different lengths arrive together, wait for slots, join a running batch between its steps, and
reuse the slots of finished ones; each must get exactly the tokens ``Engine.generate`` gives its
prompt alone (a separate code path: the engine's own decode loop over a batch-1 cache).
"""

from __future__ import annotations

import threading

import pytest
import torch
from okv_testlib import VOCAB, make_model, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime.decode.graph import EagerRecorder
from omnikv_runtime.serve.batch import PrefillJob, SlotBatch
from omnikv_runtime.serve.requests import AdmissionError, ServeRequest
from omnikv_runtime.serve.scheduler import Scheduler
from omnikv_runtime.serve.text import TextStream


class PieceTokenizer:
    """Token ``i`` reads as ``pieces.get(i, f"<{i}>")``; no end-of-sequence token."""

    eos_token_id = None
    pad_token_id = 0

    def __init__(self, pieces: dict[int, str] | None = None) -> None:
        self.pieces = pieces or {}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces.get(i, f"<{i}>") for i in ids)


class Collector:
    """Gathers the events of several requests; :meth:`wait` until all have finished."""

    def __init__(self, count: int) -> None:
        self.tokens: dict[int, list[int]] = {i: [] for i in range(count)}
        self.text: dict[int, str] = {i: "" for i in range(count)}
        self.finish: dict[int, str] = {}
        self.events: dict[int, int] = {i: 0 for i in range(count)}
        self._done = threading.Event()
        self._count = count

    def sink(self, i: int):
        def on_event(event) -> None:
            self.tokens[i].extend(event.token_ids)
            self.text[i] += event.text
            self.events[i] += 1
            if event.finish_reason is not None:
                self.finish[i] = event.finish_reason
                if len(self.finish) == self._count:
                    self._done.set()

        return on_event

    def wait(self, timeout: float = 120) -> None:
        assert self._done.wait(timeout), f"finished {sorted(self.finish)} of {self._count}"


def make_engine(offload: str = "cpu", selector=None, budget: float = 0.2, host_dtype: str | None = None, hot: int = 0):
    tiers = {"device": offload} if host_dtype is None else {"device": offload, "host_dtype": host_dtype}
    if hot:
        tiers["hot_cache_tokens"] = hot
    config = omni(budget, selector, offload=tiers, prefill={"chunk_size": 32})
    config["omnikv"]["min_token_budget"] = 4
    return okv.initialize(make_model("llama"), config, tokenizer=PieceTokenizer())


PROMPT_LENGTHS = (150, 61, 97, 130, 75)


def prompts() -> list[list[int]]:
    return [make_prompt(1, length, 0, seed=10 + i)[0][0].tolist() for i, length in enumerate(PROMPT_LENGTHS)]


@pytest.mark.parametrize(
    ("offload", "selector", "host_dtype", "hot", "recorded"),
    [
        ("cpu", None, None, 0, False),
        ("none", None, None, 0, False),
        ("cpu", None, "float8_e4m3fn", 0, False),  # an FP8 host tier: codes and scales per slot row
        ("cpu", {"type": "uniform", "window_size": 4}, None, 0, False),  # a query window per slot
        ("none", {"type": "h2o"}, None, 0, False),  # state carried per request from step to step
        ("cpu", None, None, 8, False),  # a hot cache: a slot's rows are emptied for its next request
        ("cpu", {"type": "uniform", "window_size": 4}, None, 8, True),  # recorded steps, kept per layout
    ],
)
def test_each_request_gets_the_tokens_it_gets_alone(offload, selector, host_dtype, hot, recorded):
    engine = make_engine(offload, selector, host_dtype=host_dtype, hot=hot)
    new_tokens = [12, 20, 7, 16, 9]
    alone = []
    for ids, count in zip(prompts(), new_tokens, strict=True):
        out = engine.generate(torch.tensor([ids]), max_new_tokens=count, do_sample=False)
        alone.append(out[0, len(ids) :].tolist())
    recorder = EagerRecorder() if recorded else None
    scheduler = Scheduler(engine, max_batch=2, max_queue=8, max_context=256, max_new_tokens=32, recorder=recorder)
    collected = Collector(len(alone))
    scheduler.start()
    try:
        for i, (ids, count) in enumerate(zip(prompts(), new_tokens, strict=True)):
            scheduler.submit(ServeRequest(f"r{i}", tuple(ids), count, temperature=0.0), collected.sink(i))
        collected.wait()
    finally:
        scheduler.shutdown()
    assert [collected.tokens[i] for i in range(len(alone))] == alone
    assert all(reason == "length" for reason in collected.finish.values())
    assert all(collected.events[i] == new_tokens[i] for i in range(len(alone)))  # streamed token by token
    metrics = scheduler.metrics()
    assert metrics["slots_free"] == 2 and metrics["kv_bytes"]["host_used"] == 0
    assert metrics["generation_tokens_total"] == sum(new_tokens)
    assert metrics["prompt_tokens_total"] == sum(PROMPT_LENGTHS)


def test_a_seeded_sampled_request_draws_the_same_tokens_in_company():
    engine = make_engine()
    ids = prompts()
    scheduler = Scheduler(engine, max_batch=4, max_context=256, max_new_tokens=32)
    scheduler.start()
    try:
        runs = []
        for company in (0, 3):
            collected = Collector(1 + company)
            for i in range(company):
                scheduler.submit(ServeRequest(f"c{i}", tuple(ids[i + 1]), 10, temperature=1.3), collected.sink(i + 1))
            scheduler.submit(ServeRequest("s", tuple(ids[0]), 14, temperature=1.5, seed=7), collected.sink(0))
            collected.wait()
            runs.append(collected.tokens[0])
        other = Collector(1)
        scheduler.submit(ServeRequest("s2", tuple(ids[0]), 14, temperature=1.5, seed=8), other.sink(0))
        other.wait()
    finally:
        scheduler.shutdown()
    assert runs[0] == runs[1]
    assert other.tokens[0] != runs[0]  # the seed matters (14 draws at a high temperature)
    assert all(0 <= t < VOCAB for t in runs[0])


def test_cancel_frees_the_slot_and_its_host_rows():
    engine = make_engine()
    scheduler = Scheduler(engine, max_batch=2, max_context=512, max_new_tokens=200)
    first_token = threading.Event()
    ended = threading.Event()
    reasons = []

    def on_event(event):
        first_token.set()
        if event.finish_reason is not None:
            reasons.append(event.finish_reason)
            ended.set()

    scheduler.start()
    try:
        warm_up = Collector(1)  # the same prompt once: buffers sized by its selection exist from now on
        scheduler.submit(ServeRequest("warm", tuple(prompts()[0]), 3, temperature=0.0), warm_up.sink(0))
        warm_up.wait()
        before = scheduler.metrics()
        handle = scheduler.submit(ServeRequest("long", tuple(prompts()[0]), 200, temperature=0.0), on_event)
        assert first_token.wait(60)
        during = scheduler.metrics()
        handle.cancel()
        assert ended.wait(60)
        after = scheduler.metrics()
    finally:
        scheduler.shutdown()
    assert reasons == ["cancelled"]
    assert during["slots_free"] == 1 and during["kv_bytes"]["host_used"] > 0
    assert after["slots_free"] == before["slots_free"] == 2
    assert after["kv_bytes"] == before["kv_bytes"]
    assert after["generation_tokens_total"] < 3 + 200


def test_admission_refuses_what_cannot_fit_and_a_full_queue():
    scheduler = Scheduler(make_engine(), max_batch=1, max_queue=1, max_context=170, max_new_tokens=32)
    ids = tuple(prompts()[0])  # 150 tokens
    with pytest.raises(AdmissionError) as too_long:
        scheduler.submit(ServeRequest("a", ids, 30, temperature=0.0), lambda event: None)
    assert too_long.value.status == 400 and too_long.value.code == "context_length_exceeded"
    assert "150" in too_long.value.message and "170" in too_long.value.message
    with pytest.raises(AdmissionError) as too_many:
        scheduler.submit(ServeRequest("b", ids[:10], 33, temperature=0.0), lambda event: None)
    assert too_many.value.status == 400 and "32" in too_many.value.message
    # not started: one request takes the free slot's place, one waits in the queue, the third is refused
    for name in ("c", "d"):
        scheduler.submit(ServeRequest(name, ids[:10], 4, temperature=0.0), lambda event: None)
    with pytest.raises(AdmissionError) as full:
        scheduler.submit(ServeRequest("e", ids[:10], 4, temperature=0.0), lambda event: None)
    assert full.value.status == 429 and full.value.code == "queue_full"
    assert scheduler.metrics()["requests_rejected_total"] == 3


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_before_it():
    pieces = {1: "Hello", 2: " wor", 3: "ld", 4: " EN", 5: "D!", 6: " E", 7: "x"}
    stream = TextStream(PieceTokenizer(pieces), stop=(" END",))
    assert stream.add(1) == ("Hello", False)
    assert stream.add(2) == (" wor", False)
    assert stream.add(3) == ("ld", False)
    assert stream.add(4) == ("", False)  # " EN" may begin " END"
    assert stream.add(5) == ("", True)  # the text ends before the stop string
    assert stream.finish() == ""
    other = TextStream(PieceTokenizer(pieces), stop=(" END",))
    assert [other.add(t) for t in (1, 6, 7)] == [("Hello", False), ("", False), (" Ex", False)]
    assert other.finish() == ""


def test_text_stream_waits_for_a_multibyte_character_to_complete():
    class Bytes:
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    stream = TextStream(Bytes())
    euro = "€".encode()
    assert stream.add(ord("a")) == ("a", False)
    assert stream.add(euro[0]) == ("", False)
    assert stream.add(euro[1]) == ("", False)
    assert stream.add(euro[2]) == ("€", False)


def test_slots_that_cannot_fit_are_refused_with_what_to_lower(monkeypatch):
    import psutil

    from omnikv_runtime.errors import ConfigError

    available = psutil.virtual_memory()._replace(available=2**16)  # 64 KiB
    monkeypatch.setattr(psutil, "virtual_memory", lambda: available)
    with pytest.raises(ConfigError) as refused:
        Scheduler(make_engine(), max_batch=8, max_context=4096, max_new_tokens=32)
    assert "8 slots of " in str(refused.value) and "--max-batch or --max-context" in str(refused.value)


def test_eager_steps_compute_the_slots_up_to_the_last_busy_one():
    engine = make_engine()
    scheduler = Scheduler(engine, max_batch=4, max_context=256, max_new_tokens=32)
    decode_rows = []
    hook = engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: (
            decode_rows.append(kwargs["input_ids"].shape[0]) if kwargs["input_ids"].shape[1] == 1 else None
        ),
        with_kwargs=True,
    )
    collected = Collector(1)
    scheduler.start()
    try:
        scheduler.submit(ServeRequest("alone", tuple(prompts()[1]), 6, temperature=0.0), collected.sink(0))
        collected.wait()
    finally:
        scheduler.shutdown()
        hook.remove()
    assert decode_rows == [1] * 5  # one busy slot of four: one row per step (the first token came from prefill)


def test_a_layout_seen_before_replays_its_recording():
    """A request joining or leaving changes the batch's layout; a layout the batch has run before is
    replayed from its kept recording (no recording, no warm-up), and every request still gets the
    tokens it gets alone."""
    engine = make_engine(hot=8)
    ids = prompts()
    batch = SlotBatch(engine, rows=2, capacity=257, new_tokens=32, recorder=EagerRecorder())
    tokens: dict[int, list[int]] = {}

    def join(row: int, prompt: list[int]) -> None:
        job = PrefillJob(batch, row, prompt, 32)
        logits = None
        while logits is None:
            logits = job.advance()
        first = int(logits.argmax())
        batch.join(job, first)
        tokens[row] = [first]

    def steps(count: int) -> None:
        for _ in range(count):
            chosen = batch.step().argmax(dim=-1)
            batch.ids[:, 0].copy_(chosen)
            for row in tokens:
                tokens[row].append(int(chosen[row]))

    join(0, ids[1])
    steps(3)  # layout A: a warm-up, a recording, a replay
    join(1, ids[2])
    steps(3)  # layout B: the same
    assert batch.captures == 2
    second = tokens.pop(1)
    batch.leave(1)
    steps(2)  # layout A again: replayed
    assert batch.captures == 2 and batch.steps.times.eager == 2
    join(1, ids[2])
    steps(3)  # layout B again, another request in the slot: replayed
    assert batch.captures == 2 and batch.steps.times.eager == 2
    assert len(batch.steps.kept()) == 2  # one recording per layout
    for row, prompt, count in ((0, ids[1], len(tokens[0])), (1, ids[2], 4)):
        alone = engine.generate(torch.tensor([prompt]), max_new_tokens=count, do_sample=False)[0, len(prompt) :]
        assert tokens[row] == alone.tolist(), row
    alone = engine.generate(torch.tensor([ids[2]]), max_new_tokens=len(second), do_sample=False)[0, len(ids[2]) :]
    assert second == alone.tolist()


def test_the_smallest_context_serves_and_one_less_is_refused_at_start():
    """At 12 to 14 tokens of context the server started, then failed every request of more than one token
    (the slot's masks one column narrower than the KV buffers): 15 is the floor, and it serves."""
    from omnikv_runtime.errors import ConfigError
    from omnikv_runtime.serve import MIN_CONTEXT

    engine = make_engine()
    with pytest.raises(ConfigError, match=f"max_context.*at least {MIN_CONTEXT} tokens"):
        Scheduler(engine, max_batch=2, max_context=MIN_CONTEXT - 1)
    scheduler = Scheduler(engine, max_batch=2, max_context=MIN_CONTEXT)
    prompt = prompts()[0][:3]
    collected = Collector(2)
    scheduler.start()
    try:
        for index, max_tokens in enumerate((2, MIN_CONTEXT - len(prompt))):
            request = ServeRequest(f"r{index}", tuple(prompt), max_tokens, temperature=0.0)
            scheduler.submit(request, collected.sink(index))
        collected.wait()
    finally:
        scheduler.shutdown()
    assert collected.finish == {0: "length", 1: "length"}
    alone = engine.generate(torch.tensor([prompt]), max_new_tokens=MIN_CONTEXT - len(prompt))[0, len(prompt) :]
    assert collected.tokens[1] == alone.tolist() and collected.tokens[0] == alone[:2].tolist()


@pytest.mark.parametrize("host_dtype", [None, "float8_e4m3fn"])
def test_a_lone_request_in_a_recorded_step_fetches_only_its_own_rows(host_dtype):
    """A recorded step computes every slot, and an idle slot's selection is padding: it must not cross
    to the GPU. One request in four slots moves per step the rows it selects, as it would alone."""
    engine = make_engine(host_dtype=host_dtype)
    prompt = prompts()[0]
    batch = SlotBatch(engine, rows=4, capacity=257, new_tokens=32, recorder=EagerRecorder())
    job = PrefillJob(batch, 2, prompt, 32)  # a slot in the middle: idle slots on both sides
    logits = None
    while logits is None:
        logits = job.advance()
    batch.join(job, int(logits.argmax()))
    tokens = [int(logits.argmax())]
    request = batch.cache.requests[2]
    row_bytes = sum(arena.fetch_row_bytes for arena in batch.cache.tiers.arenas if arena is not None)
    for _ in range(5):
        before = engine.transfer.stats.bytes_fetched
        chosen = batch.step().argmax(dim=-1)
        assert engine.transfer.stats.bytes_fetched - before == request.token_budget * row_bytes
        batch.ids[:, 0].copy_(chosen)
        tokens.append(int(chosen[2]))
    alone = engine.generate(torch.tensor([prompt]), max_new_tokens=len(tokens), do_sample=False)[0, len(prompt) :]
    assert tokens == alone.tolist()

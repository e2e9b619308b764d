"""One hook for observers: an engine's listeners see each forward's start, each selection and each fetch;
the cache reads no clock and builds no event without them, and calls none while a CUDA graph records."""

from __future__ import annotations

import time

import pytest
import torch
from okv_testlib import PAD, PROMPT_LEN, make_model, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime.listeners import EngineListener, Fetch, ForwardStart, Selection, recording

NEW = 5


class Everything(EngineListener):
    def __init__(self) -> None:
        self.events: list = []

    def forward_start(self, event: ForwardStart) -> None:
        self.events.append(event)

    def selection(self, event: Selection) -> None:
        self.events.append(event)

    def fetch(self, event: Fetch) -> None:
        self.events.append(event)


@pytest.mark.parametrize("offload", ["cpu", "none"])
def test_events_of_a_generation(offload):
    config = omni(budget=8, offload={"device": offload}, prefill={"chunk_size": 16})
    engine = okv.initialize(make_model("llama"), config)
    ids, mask = make_prompt(2)
    with engine.listening(Everything()) as listener:
        engine.generate(ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD)
    assert engine.listeners == []  # the block's listener is gone afterwards
    starts = [e for e in listener.events if isinstance(e, ForwardStart)]
    # three prefill chunks of 16, 16 and 8 tokens, then a decode step per new token after the first
    assert [(e.decoding, e.tokens, e.past) for e in starts] == [(False, 16, 0), (False, 16, 16), (False, 8, 32)] + [
        (True, 1, PROMPT_LEN + step) for step in range(NEW - 1)
    ]
    assert all(e.cache is engine.last_cache for e in listener.events)
    selections = [e for e in listener.events if isinstance(e, Selection)]
    fetches = [e for e in listener.events if isinstance(e, Fetch)]
    assert [(e.layer, e.step) for e in selections] == [(layer, step) for step in range(NEW - 1) for layer in (1, 4)]
    assert all(
        e.indices.shape == (2, 8) and e.context.token_budget == 8 and e.context.layer == e.layer for e in selections
    )
    # every selection is followed by its segment's fetch; the fetches add up to what the transfer engine moved
    kinds = [type(e).__name__ for e in listener.events if not isinstance(e, ForwardStart)]
    assert kinds == ["Selection", "Fetch"] * len(selections)
    assert [(e.layer, e.tokens) for e in fetches] == [(e.layer, 8) for e in selections]
    assert sum(e.bytes for e in fetches) == engine.stats()["transfer"]["bytes_fetched"]
    assert (sum(e.bytes for e in fetches) > 0) == (offload == "cpu")  # GPU mode reads the tier in place
    assert all(e.start <= e.end for e in fetches)


def test_no_listener_no_clock_and_no_event(monkeypatch):
    """The hot path: without a listener a decode step reads no clock (and so builds no event): a run of more
    steps reads the clock as often as a shorter one."""
    reads = []
    clock = time.perf_counter
    monkeypatch.setattr(time, "perf_counter", lambda: reads.append(1) or clock())
    engine = okv.initialize(make_model("llama"), omni(budget=8))
    ids, mask = make_prompt(2)

    def clock_reads(new_tokens: int) -> int:
        reads.clear()
        engine.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=PAD)
        return len(reads)

    assert clock_reads(3) == clock_reads(9)
    with engine.listening(EngineListener()):  # a listener that overrides nothing: events are built
        # per decode step: the forward's start in the cache, the model's forward called and returned,
        # and each of the two fetches' start and end
        assert clock_reads(9) - clock_reads(3) == 6 * (3 + 2 * 2)


def test_no_event_while_a_cuda_graph_records():
    """A step being recorded (the graphed step holds ``recording()`` around a capture) runs no Python
    listener: its events would not be replayed. The cache still selects and fetches."""
    model = make_model("llama")
    engine = okv.initialize(model, omni(budget=8))
    ids, mask = make_prompt(1)
    listener = Everything()
    engine.add_listener(listener)
    cache = engine.new_cache(reserve_tokens=64, prompt_tokens=PROMPT_LEN)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, **{engine.cache_keyword: cache})
        prefill_events = len(listener.events)
        token = out.logits[:, -1:].argmax(-1)
        with recording():
            model(input_ids=token, use_cache=True, **{engine.cache_keyword: cache})
    assert prefill_events == 1 and len(listener.events) == prefill_events
    assert all(segment.selection is not None for segment in cache.tiers.segments)
    engine.remove_listener(listener)
    engine.remove_listener(listener)  # removing twice does nothing
    assert engine.listeners == []


def test_listeners_added_later_reach_existing_caches():
    engine = okv.initialize(make_model("llama"), omni(budget=8))
    cache = engine.new_cache()
    listener = Everything()
    engine.add_listener(listener)
    engine.add_listener(listener)  # once only
    assert cache.listeners is engine.listeners and engine.listeners == [listener]

"""The graphed step on a CPU: the recording path CUDA takes, through the stand-in recorder.

:class:`~omnikv_runtime.decode.graph.EagerRecorder` runs a step under the same recording mark a
CUDA graph capture holds, so these tests exercise what the GPU does when it records: no observer
is called and nothing synchronizes while a step records or replays, host-side counts are made by
the runner, recordings are kept per key and replayed, and a recording that fails leaves the step
running eagerly.
"""

from __future__ import annotations

import logging

import pytest
import torch
from okv_testlib import PAD, make_model, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime.decode.graph import EagerRecorder, GraphedStep
from omnikv_runtime.decode.loop import EAGER_STEPS_BEFORE_CAPTURE, DecodeLoop, StopSettings
from omnikv_runtime.decode.sampling import SamplingSettings
from omnikv_runtime.layout import reserve_tokens
from omnikv_runtime.listeners import EngineListener, is_recording
from omnikv_runtime.profiling import profile_memory
from omnikv_runtime.transfer import TorchTransferEngine

NEW = 9


class Counting(EngineListener):
    """Counts events, and fails the test if one arrives while a step records."""

    def __init__(self) -> None:
        self.counts = {"forward_start": 0, "selection": 0, "fetch": 0, "forward_end": 0}

    def _seen(self, name: str) -> None:
        assert not is_recording(), f"{name} delivered while a step was recording"
        self.counts[name] += 1

    def forward_start(self, event) -> None:
        self._seen("forward_start")

    def selection(self, event) -> None:
        self._seen("selection")

    def fetch(self, event) -> None:
        self._seen("fetch")

    def forward_end(self, event) -> None:
        self._seen("forward_end")


def _generate(engine, ids, mask, recorder):
    """Greedy tokens through the engine's decode loop, with ``recorder`` (None: eager)."""
    batch, prompt = ids.shape
    cache = engine.new_cache(reserve_tokens=reserve_tokens(prompt, NEW), prompt_tokens=prompt)
    stop = StopSettings(pad_token_id=PAD)
    loop = DecodeLoop(
        engine.model, cache, engine.cache_keyword, SamplingSettings(), stop, NEW, False, recorder=recorder
    )
    with torch.inference_mode():
        loop.prefill(ids, mask, chunk_size=16)
        tokens = loop.decode()
    return tokens, cache, loop


@pytest.mark.parametrize("offload", ["cpu", "none"])
def test_a_recorded_step_under_a_profiler_and_listeners_equals_eager_steps(offload, monkeypatch, tmp_path):
    def no_sync_while_recording(*args, **kwargs):
        assert not is_recording(), "a synchronisation inside a recorded step breaks a CUDA graph capture"

    monkeypatch.setattr(torch.cuda, "synchronize", no_sync_while_recording)
    tiers = {"device": offload, "hot_cache_tokens": 16} if offload == "cpu" else {"device": offload}
    config = omni(8, offload=tiers, profiling={"trace": False, "png": False})
    engine = okv.initialize(make_model("llama"), config)
    ids, mask = make_prompt(2)
    eager, eager_cache, _ = _generate(engine, ids, mask, None)
    eager_stats = engine.transfer.stats.as_dict()
    engine.transfer.reset_stats()
    listener = Counting()
    with engine.listening(listener), profile_memory(engine, tmp_path / "prof") as profiler:
        engine._last_cache = None  # the profiler samples the cache the forwards announce
        recorded, recorded_cache, loop = _generate(engine, ids, mask, EagerRecorder())
    report = profiler.report()  # its last sample was taken when the profile stopped
    assert torch.equal(recorded, eager)
    assert loop.steps.times.recordings == 1 and loop.steps.times.replays == NEW - 1 - EAGER_STEPS_BEFORE_CAPTURE
    # the runner made the host-side counts the replayed steps' Python did not make
    assert recorded_cache.get_seq_length() == eager_cache.get_seq_length()
    assert recorded_cache.selected_log == eager_cache.selected_log
    assert engine.transfer.stats.as_dict() == eager_stats
    assert recorded_cache.hot_counters() == eager_cache.hot_counters()
    # observers saw the prefill chunks and the eager warm-up steps, never the recording or the replays
    prefill_chunks = 3
    assert listener.counts["forward_start"] == prefill_chunks + EAGER_STEPS_BEFORE_CAPTURE
    assert listener.counts["forward_end"] == prefill_chunks + EAGER_STEPS_BEFORE_CAPTURE
    assert listener.counts["selection"] == listener.counts["fetch"] == 2 * EAGER_STEPS_BEFORE_CAPTURE
    kinds = [mark["kind"] for mark in report["marks"]]
    assert kinds.count("prefill") == prefill_chunks and kinds.count("decode") == EAGER_STEPS_BEFORE_CAPTURE
    # the tiers the profiler reports are the cache's, recorded or not
    last = report["samples"][-1]["tiers"]
    assert last == eager_cache.tier_bytes() == recorded_cache.tier_bytes()


def _graphed(max_graphs: int = 2) -> GraphedStep:
    return GraphedStep(EagerRecorder(), TorchTransferEngine("cpu", "cpu", False), warmup=1, max_graphs=max_graphs)


def test_recordings_are_kept_per_key_and_replayed():
    steps = _graphed(max_graphs=2)
    runs = []
    for key in ["a", "a", "a", "b", "b", "a", "b", "c", "c", "a"]:
        steps.run(key, lambda key=key: runs.append(key), note=lambda key=key: f"noted {key}")
    # a: warm-up, recording, replay; b: warm-up, recording; a and b again: replays; c evicts a, the least used
    assert steps.times.recordings == 4  # a, b, c, then a again once c pushed it out
    assert steps.kept() == ["c", "a"]
    assert len(runs) == 10  # every step ran exactly once, whichever way
    assert steps.times.eager == 3  # the warm-ups of a, b and c (a's second recording needs none)


def test_a_recording_that_fails_runs_the_step_eagerly_and_says_why(caplog):
    steps = _graphed()
    runs = []

    def breaks_when_recorded() -> None:
        if is_recording():
            raise RuntimeError("operation not permitted when stream is capturing")
        runs.append(1)

    with caplog.at_level(logging.WARNING, logger="omnikv_runtime.decode.graph"):
        for _ in range(4):
            assert steps.run("k", breaks_when_recorded) is None
    assert len(runs) == 4 and steps.kept() == [] and steps.times.recordings == 0
    assert "operation not permitted" in caplog.text and "runs eagerly" in caplog.text
    assert steps.times.failed == ["RuntimeError: operation not permitted when stream is capturing"]


def test_without_a_recorder_every_step_is_eager():
    steps = GraphedStep(None, TorchTransferEngine("cpu", "cpu", False))
    runs = []
    for _ in range(3):
        assert steps.run("k", lambda: runs.append(is_recording())) is None
    assert runs == [False, False, False] and steps.times.eager == 3

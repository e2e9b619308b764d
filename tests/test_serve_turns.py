"""The scheduler's turns as plans (``omnikv_runtime.serve.turns``), on one process.

A plan must reach the other ranks as it left rank 0 (its encoding is what they receive); a failed turn
fails its requests and frees their slots, and the scheduler goes on; a scheduler that has stopped takes
no request; the roles of rank 0 (start) and of the others (follow) are not mixed up. Two ranks:
tests/test_tensor_parallel.py.
"""

from __future__ import annotations

import threading

import pytest
from okv_testlib import make_model, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime.errors import ConfigError
from omnikv_runtime.serve.requests import AdmissionError, ServeRequest
from omnikv_runtime.serve.scheduler import Scheduler
from omnikv_runtime.serve.turns import TurnPlan


class Tokens:
    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


def scheduler() -> Scheduler:
    config = omni(0.2, prefill={"chunk_size": 32})
    engine = okv.initialize(make_model("llama"), config, tokenizer=Tokens())
    return Scheduler(engine, max_batch=2, max_context=128, max_new_tokens=16)


def prompt(length: int, seed: int) -> tuple[int, ...]:
    return tuple(make_prompt(1, length, 0, seed=seed)[0][0].tolist())


@pytest.mark.parametrize(
    "plan",
    [
        TurnPlan(),
        TurnPlan(drop=[1], admit=[(1, [5, 6, 7]), (0, list(range(3, 300)))], prefill=[(1, 3), (0, 29)]),
        TurnPlan(drop=[0, 3], prefill=[]),
        TurnPlan(admit=[(2, [9])], prefill=[(0, 32)]),
        TurnPlan(prefill=[(3, 1), (1, 16), (2, 7)]),
    ],
)
def test_a_plan_decodes_to_itself(plan):
    message = plan.encode()
    assert all(isinstance(value, int) for value in message)
    assert TurnPlan.decode(message) == plan


def test_a_failed_turn_fails_its_requests_frees_their_slots_and_the_scheduler_goes_on(monkeypatch):
    served = scheduler()
    ended, finished = {}, threading.Event()

    def sink(name):
        def on_event(event):
            if event.finish_reason is not None:
                ended[name] = (event.finish_reason, event.error)
                finished.set()

        return on_event

    real_step = served.batch.step
    calls = []

    def failing_step():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the device went away")
        return real_step()

    monkeypatch.setattr(served.batch, "step", failing_step)
    served.start()
    try:
        served.submit(ServeRequest("a", prompt(40, 1), 8, temperature=0.0), sink("a"))
        assert finished.wait(60)
        finished.clear()
        served.submit(ServeRequest("b", prompt(30, 2), 4, temperature=0.0), sink("b"))
        assert finished.wait(60)
    finally:
        served.shutdown()
    assert ended["a"] == ("error", "RuntimeError: the device went away")
    assert ended["b"] == ("length", None)
    assert served.batch.cache.free_rows() == [0, 1] and served.turns.decoding == set() and served.turns.jobs == {}


def test_a_stopped_scheduler_takes_no_request():
    served = scheduler()
    served.start()
    served.shutdown()
    with pytest.raises(AdmissionError) as refused:
        served.submit(ServeRequest("late", prompt(10, 3), 2, temperature=0.0), lambda event: None)
    assert refused.value.status == 503 and refused.value.code == "server_shutting_down"


def test_one_process_serves_and_does_not_follow():
    served = scheduler()
    assert served.follower is False
    with pytest.raises(ConfigError, match="another rank to follow"):
        served.follow()

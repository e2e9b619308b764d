"""The server's scheduler under tensor parallelism: rank 0 schedules, the other ranks follow its plans.

Two ranks, as users launch them: ``torchrun --nproc-per-node 2 tests/scripts/tp_scheduler.py OUT``. Every
rank builds the same :class:`~omnikv_runtime.serve.scheduler.Scheduler` (two slots) over a tiny random
Llama; rank 0 starts it and submits requests straight to it (no HTTP), rank 1 calls ``follow()``. The
requests: greedy ones of different lengths arriving while others decode and waiting for a slot, one that
ends at a stop string, one cancelled while it decodes and one cancelled as soon as it is sent, then, after
an idle spell (empty plans), a seeded sampled one, and last one whose prompt starts with the first 48 tokens
of the first request's (the prefix cache holds them: rank 0's plan says so, and every rank copies them). Every
rank writes ``OUT.rank<R>.json``: each request's tokens and finish reason (rank 0), each request's greedy
tokens from ``engine.generate`` alone on the same ranks, the turns each rank ran, its prefill forwards (packed
ones: chunks of two requests in one forward, within a turn's budget of 40 prompt tokens) and prefilled tokens,
its free slots at the end, its prefix cache's blocks (their digests, least recently used first) and tokens
reused (rank 0), and (rank 0) the sampled request's tokens from a one-rank scheduler over the same weights.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' shared helpers
from okv_testlib import make_model, make_prompt  # noqa: E402

import omnikv_runtime as okv  # noqa: E402
from omnikv_runtime.cache.packed import PackedPrefill  # noqa: E402
from omnikv_runtime.distributed import leave_process_group  # noqa: E402
from omnikv_runtime.serve.prefix_cache import block_bytes  # noqa: E402
from omnikv_runtime.serve.requests import ServeRequest  # noqa: E402
from omnikv_runtime.serve.scheduler import Scheduler  # noqa: E402

# name -> (prompt length, new tokens, temperature, seed)
REQUESTS = {
    "a": (61, 14, 0.0, None),
    "b": (45, 12, 0.0, None),  # stops at a stop string: its third token's text
    "c": (52, 10, 0.0, None),  # waits for a slot
    "d": (70, 40, 0.0, None),  # cancelled after its second token
    "e": (33, 30, 0.0, None),  # cancelled as soon as it is sent
    "s": (40, 12, 1.3, 7),  # sampled, seeded
    "f": (24, 6, 0.0, None),
    "g": (68, 6, 0.0, None),  # the first 48 tokens of a's prompt, then its own 20
}
SHARED = 48
SPECS = list(REQUESTS.items())
STOP_AT = 2  # b's stop string is the text of its token at this index


class Tokens:
    """Token ``i`` reads as ``<i>``; no end-of-sequence token."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)


class Requests:
    """Each request's events; waits on their progress."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[int]] = {name: [] for name in REQUESTS}
        self.finish: dict[str, str] = {}
        self.changed = threading.Condition()

    def sink(self, name: str):
        def on_event(event) -> None:
            with self.changed:
                self.tokens[name].extend(event.token_ids)
                if event.finish_reason is not None:
                    self.finish[name] = event.finish_reason
                self.changed.notify_all()

        return on_event

    def wait(self, until, timeout: float = 120) -> None:
        with self.changed:
            assert self.changed.wait_for(until, timeout), (self.tokens, self.finish)


def engine(world: int):
    config = {
        "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 8},
        "offload": {"device": "cpu"},
        "prefill": {"chunk_size": 16},
        "distributed": {"tp_size": world},
    }
    return okv.initialize(make_model("llama"), config, tokenizer=Tokens())


def prompts() -> dict[str, list[int]]:
    ids = {name: make_prompt(1, spec[0], 0, seed=30 + i)[0][0].tolist() for i, (name, spec) in enumerate(SPECS)}
    ids["g"] = ids["a"][:SHARED] + ids["g"][: REQUESTS["g"][0] - SHARED]
    return ids


def request(name: str, stop: tuple[str, ...] = ()) -> ServeRequest:
    length, new, temperature, seed = REQUESTS[name]
    return ServeRequest(name, tuple(prompts()[name]), new, temperature=temperature, seed=seed, stop=stop)


def scheduler_for(served) -> Scheduler:
    blocks = 20 * sum(block_bytes(served, 16))
    # a turn prefills up to 40 prompt tokens: chunks of two requests (s and f) run packed in one forward
    return Scheduler(
        served,
        max_batch=2,
        max_queue=8,
        max_context=128,
        max_new_tokens=48,
        prefix_cache_bytes=blocks,
        prefix_block_tokens=16,
        max_prefill_tokens=40,
    )


def count_packed_forwards(model) -> list[int]:
    """A one-item list counting the model's forwards through a packed prefill (several requests' chunks)."""
    count = [0]

    def hook(module, args, kwargs, output) -> None:
        count[0] += isinstance(kwargs.get("cache", kwargs.get("past_key_values")), PackedPrefill)

    model.register_forward_hook(hook, with_kwargs=True)
    return count


def serve(scheduler: Scheduler, alone: dict[str, list[int]]) -> Requests:
    """Rank 0: the requests' schedule (see the module docstring)."""
    seen = Requests()
    handles = {}

    def submit(name: str, stop: tuple[str, ...] = ()) -> None:
        handles[name] = scheduler.submit(request(name, stop), seen.sink(name))

    scheduler.start()
    try:
        submit("a")
        seen.wait(lambda: len(seen.tokens["a"]) >= 3)
        submit("b", stop=(Tokens().decode([alone["b"][STOP_AT]]),))
        submit("c")  # two slots: it waits for one
        seen.wait(lambda: len(seen.tokens["b"]) >= 1)
        submit("d")
        submit("e")
        handles["e"].cancel()
        seen.wait(lambda: len(seen.tokens["d"]) >= 2)
        handles["d"].cancel()
        seen.wait(lambda: len(seen.finish) == 5)
        threading.Event().wait(0.3)  # idle: empty plans go out
        submit("s")
        submit("f")
        seen.wait(lambda: len(seen.finish) == len(REQUESTS) - 1)
        submit("g")
        seen.wait(lambda: len(seen.finish) == len(REQUESTS))
    finally:
        scheduler.shutdown()
    return seen


def main() -> int:
    out = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    served = engine(world)
    greedy = [name for name, spec in REQUESTS.items() if spec[2] == 0.0]
    alone = {}
    for name in greedy:  # every rank, in the same order: engine.generate runs the ranks' collectives
        ids = prompts()[name]
        out_ids = served.generate(torch.tensor([ids]), max_new_tokens=REQUESTS[name][1], do_sample=False)
        alone[name] = out_ids[0, len(ids) :].tolist()
    scheduler = scheduler_for(served)
    packed = count_packed_forwards(served.model)
    Scheduler.idle_plan_s = 0.05
    result = {"world": world, "alone": alone}
    if rank == 0:
        seen = serve(scheduler, alone)
        result.update(tokens=seen.tokens, finish=seen.finish)
    else:
        scheduler.follow()
    result["turns"] = scheduler.turns.turns_run
    result["packed_forwards"] = packed[0]
    result["prefill"] = [scheduler.batch.prefill_tokens, scheduler.batch.prefill_forwards]
    result["free_slots"] = scheduler.batch.cache.free_rows()
    result["host_used"] = scheduler.metrics()["kv_bytes"]["host_used"]
    result["prefix_blocks"] = [key.hex() for key in scheduler.prefixes._blocks]
    result["prefix_hit_tokens"] = scheduler.metrics()["prefix_cache_hit_tokens_total"]
    if rank == 0:  # the sampled request alone, on one rank with the same weights
        single = scheduler_for(engine(1))
        seen = Requests()
        single.start()
        try:
            single.submit(request("s"), seen.sink("s"))
            seen.wait(lambda: "s" in seen.finish)
        finally:
            single.shutdown()
        result["sampled_one_rank"] = seen.tokens["s"]
    with open(f"{out}.rank{rank}.json", "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    leave_process_group()  # a rank exiting while another still runs aborts gloo's teardown
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The server's batch step against the engine's own decode step, and what a request joining costs.

Llama-3-8B geometry, random bf16 weights; every slot (and the engine's batch) holds the same
context of random KV, filled directly (no prefill). Per host tier and batch:

- ``engine_ms``: the engine's decode step for one ``generate`` call of that batch (rows aligned),
  replayed from its CUDA graph: the baseline;
- ``slots_ms``: the server's step with every slot busy (rows at their own positions, each
  selecting alone), replayed from its CUDA graph;
- ``eager_ms`` and ``record_ms``: the server's step run eagerly, and recording it, which is what a
  request joining or leaving costs when the batch's layout is new (timed warm, after the replays:
  the last request leaves), while ``first_eager_ms`` is the very first slot step (Triton compiling
  its kernels included);
- ``rejoin_ms`` and ``recordings_on_rejoin``: a request of the same length takes the freed slot, so
  the layout is one the batch has run before: its kept recording replays at once (0 recordings);
- ``lone_ms``: the server's step with one request left in the batch's slots (the others idle), replayed,
  and ``lone_over_engine_1`` its ratio to the engine's batch-1 step (when batch 1 is measured too): what a
  request alone on a server of that many slots gets per token.

    python benchmarks/serve_step.py --context 32768 --batches 1,4,8 --tiers none,cpu

Prints JSON on stdout and a table on stderr; ``--tiny`` checks the script on a small geometry.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

import omnikv_runtime as okv
from omnikv_runtime.decode.loop import DecodeLoop, StopSettings
from omnikv_runtime.decode.sampling import SamplingSettings
from omnikv_runtime.serve.batch import SlotBatch
from omnikv_runtime.tables import format_table

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode import FILTER_LAYERS, fill, random_kv, random_model, run_header  # noqa: E402
from kv_fill import fill_prompt  # noqa: E402
from step_timing import decode_steps, sync  # noqa: E402

NEW_TOKENS = 64


def engine_step_ms(engine, model, config, device, dtype, batch: int, context: int, steps: int) -> float:
    cache = engine.new_cache(reserve_tokens=context + steps + 8, prompt_tokens=context)
    fill(cache, config, batch, context, device, dtype)
    use_graph = device.type == "cuda"
    loop = DecodeLoop(model, cache, engine.cache_keyword, SamplingSettings(), StopSettings(), steps + 4, use_graph)
    loop.start_after_fill(batch, device)
    times = decode_steps(loop.run_step, steps + 3, device)[3:]  # two eager warm-up steps and the recording
    return statistics.median(times)


def occupy(slots: SlotBatch, row: int, config, device, dtype, context: int) -> None:
    """A request of ``context`` random tokens takes slot ``row`` (filled directly, then activated)."""
    prefill = slots.cache.row_cache(row, context)
    fill_prompt(prefill, context, 32768, lambda layer, start, count: random_kv(config, 1, count, device, dtype))
    slots.cache.activate(row, prefill)
    slots.ids[row, 0] = 5
    slots.positions[row, 0] = context
    sync(device)


def slot_batch(engine, config, device, dtype, batch: int, context: int) -> SlotBatch:
    slots = SlotBatch(engine, batch, context + NEW_TOKENS + 1, NEW_TOKENS)
    for row in range(batch):
        occupy(slots, row, config, device, dtype, context)
    return slots


def measure(args, engine, model, config, device, dtype, batch: int) -> dict:
    row = {"tier": engine.config.offload.device, "batch": batch, "context": args.context}
    row["engine_ms"] = engine_step_ms(engine, model, config, device, dtype, batch, args.context, args.steps)
    engine.release_graphs()
    slots = slot_batch(engine, config, device, dtype, batch, args.context)
    row["first_eager_ms"] = decode_steps(slots.step, 1, device)[0]  # the first slot step: kernels compile
    decode_steps(slots.step, 1, device)  # recording, then the first replay
    row["slots_ms"] = statistics.median(decode_steps(slots.step, args.steps, device))
    slots.leave(batch - 1)  # a request leaves: a layout the batch has not run yet
    row["eager_ms"] = decode_steps(slots.step, 1, device)[0]  # the new layout's eager step
    row["record_ms"] = decode_steps(slots.step, 1, device)[0]  # recording it, then the first replay
    recordings = slots.captures
    occupy(slots, batch - 1, config, device, dtype, args.context)  # another request of that length joins
    row["rejoin_ms"] = decode_steps(slots.step, 1, device)[0]  # the full layout again: its kept recording
    row["recordings_on_rejoin"] = slots.captures - recordings
    for leaving in range(1, batch):  # one request left, in slot 0
        slots.leave(leaving)
    decode_steps(slots.step, 2, device)  # the lone layout's eager step, then its recording
    row["lone_ms"] = statistics.median(decode_steps(slots.step, args.steps, device))
    row["slots_over_engine"] = row["slots_ms"] / row["engine_ms"]
    row["graph"] = slots.use_graph
    del slots
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--tiers", default="none,cpu", help="offload.device values (none: GPU mode)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="a small geometry (checks the script)")
    args = parser.parse_args(argv)
    device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device, model, config, dtype = random_model(device_name, args.tiny)
    rows = []
    for tier in args.tiers.split(","):
        settings = {
            "omnikv": {"filter_layers": FILTER_LAYERS, "wait_layers": 1, "token_budget": 2048},
            "offload": {"device": tier},
        }
        engine = okv.initialize(model, settings)
        tier_rows = []
        for batch in (int(b) for b in args.batches.split(",")):
            tier_rows.append(measure(args, engine, model, config, device, dtype, batch))
            print(json.dumps(tier_rows[-1]), file=sys.stderr)
        alone = next((r["engine_ms"] for r in tier_rows if r["batch"] == 1), None)
        for row in tier_rows:
            row["lone_over_engine_1"] = row["lone_ms"] / alone if alone else None
        rows += tier_rows
        engine.detach()
    print(json.dumps({**run_header(device, "serve_step.py", argv), "rows": rows}, indent=1))
    columns = [("tier", "tier", ""), ("batch", "batch", ""), ("context", "context", "")]
    timed = ("engine_ms", "slots_ms", "slots_over_engine", "eager_ms", "record_ms", "rejoin_ms", "first_eager_ms")
    timed += ("lone_ms", "lone_over_engine_1")
    columns += [(name, name, ".2f") for name in timed] + [("recordings_on_rejoin", "recordings_on_rejoin", "")]
    print(format_table(rows, columns, markdown=True), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The server's batch under tensor parallelism: each request's tokens against ``engine.generate`` alone.

One rank: ``python tests/scripts/tp_serve.py OUT``. Two ranks, as users launch them:
``torchrun --nproc-per-node 2 tests/scripts/tp_serve.py OUT``. Every rank builds the server's
batch (:class:`~omnikv_runtime.serve.batch.SlotBatch`, two slots) over a tiny random Llama and
drives the same schedule: three requests of different lengths join between decode steps, one
leaves, a third takes its slot. Every rank writes ``OUT.rank<R>.json``: for the plain offloaded
tier and with a hot cache, each request's greedy tokens from the batch and from ``engine.generate``
of its prompt alone, and the KV heads the rank holds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' shared helpers
from okv_testlib import make_model, make_prompt  # noqa: E402

import omnikv_runtime as okv  # noqa: E402
from omnikv_runtime.distributed import leave_process_group  # noqa: E402
from omnikv_runtime.serve.batch import PrefillJob, SlotBatch  # noqa: E402

# (arrives before decode step, prompt length, new tokens)
REQUESTS = ((0, 61, 9), (2, 45, 5), (5, 52, 6))


def run(world: int, hot: int) -> dict:
    model = make_model("llama")  # the same weights on every rank; DeepSpeed keeps each rank's shard of them
    offload = {"device": "cpu", "hot_cache_tokens": hot} if hot else {"device": "cpu"}
    config = {
        "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 8},
        "offload": offload,
        "prefill": {"chunk_size": 16},
        "distributed": {"tp_size": world},
    }
    engine = okv.initialize(model, config)
    prompts = [make_prompt(1, length, 0, seed=20 + i)[0][0].tolist() for i, (_, length, _) in enumerate(REQUESTS)]
    batch = SlotBatch(engine, rows=2, capacity=96, new_tokens=16)
    waiting = list(range(len(REQUESTS)))
    running: dict[int, int] = {}  # row -> request
    tokens: dict[int, list[int]] = {i: [] for i in range(len(REQUESTS))}
    step = 0
    with torch.inference_mode():
        while waiting or running:
            free = [row for row in range(batch.rows) if row not in running]
            while waiting and free and REQUESTS[waiting[0]][0] <= step:
                request, row = waiting.pop(0), free.pop(0)
                job = PrefillJob(batch, row, prompts[request], 16)
                logits = None
                while logits is None:
                    logits = job.advance()
                first = int(logits.argmax())
                batch.join(job, first)
                tokens[request].append(first)
                running[row] = request
            if running:
                chosen = batch.step().argmax(dim=-1)
                batch.ids[:, 0].copy_(chosen)
                for row, request in list(running.items()):
                    tokens[request].append(int(chosen[row]))
                    if len(tokens[request]) == REQUESTS[request][2]:
                        batch.leave(row)
                        del running[row]
            step += 1
        alone = []
        for prompt, (_, _, new) in zip(prompts, REQUESTS, strict=True):
            out = engine.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, pad_token_id=0)
            alone.append(out[0, len(prompt) :].tolist())
    heads = engine.model.model.layers[0].self_attn.k_proj.weight.shape[0] // 16  # KV heads this rank holds
    return {"batch": [tokens[i] for i in range(len(REQUESTS))], "alone": alone, "kv_heads_on_this_rank": heads}


def main() -> int:
    out = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    result = {"world": world, "tiers": {str(hot): run(world, hot) for hot in (0, 12)}}
    with open(f"{out}.rank{rank}.json", "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    leave_process_group()  # a rank exiting while another still runs aborts gloo's teardown
    return 0


if __name__ == "__main__":
    sys.exit(main())

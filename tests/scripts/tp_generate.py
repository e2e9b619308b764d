"""Greedy tokens and filter-layer selections of a tiny random Llama under OmniKV, on the ranks that launched it.

One rank: ``python tests/scripts/tp_generate.py OUT``. Tensor parallel over two ranks, as users
launch it: ``torchrun --nproc-per-node 2 tests/scripts/tp_generate.py OUT``. Every rank writes
``OUT.rank<R>.json``: for budgets 1.0 and 8 tokens, the tokens of ``engine.generate`` and of
transformers' ``generate`` through the runtime's cache, and each filter layer's selected indices
per decode step, the tier bytes of the cache that generate filled and the parameters the rank holds.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' shared helpers
from okv_testlib import make_model  # noqa: E402

import omnikv_runtime as okv
from omnikv_runtime.distributed import leave_process_group
from omnikv_runtime.layout import reserve_tokens
from omnikv_runtime.listeners import SelectionRecorder

NEW_TOKENS = 16


def run(budget: float | int, world: int) -> dict:
    model = make_model("llama")  # the same weights on every rank; DeepSpeed keeps each rank's shard of them
    ids = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids[1, :7] = 0
    engine = okv.initialize(
        model,
        {
            "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": budget},
            "offload": {"device": "cpu"},
            "prefill": {"chunk_size": 16},
            "distributed": {"tp_size": world},
        },
    )
    tokens = engine.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    cache = engine.new_cache(reserve_tokens=reserve_tokens(48, NEW_TOKENS), prompt_tokens=48)
    trace = SelectionRecorder(contexts=False)
    with torch.inference_mode(), engine.listening(trace):
        through_cache = engine.model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            **{engine.cache_keyword: cache},
        )
    heads = engine.model.model.layers[0].self_attn.k_proj.weight.shape[0] // 16  # KV heads this rank holds
    selections: dict[str, list] = {}
    for event in trace.records:
        selections.setdefault(str(event.layer), []).append(event.indices.tolist())
    return {
        "tokens": tokens.tolist(),
        "tokens_through_cache": through_cache.tolist(),
        "selections": selections,
        "kv_heads_on_this_rank": heads,
        "tier_bytes": cache.tier_bytes(),  # after transformers' generate through it: what the planner plans
        "parameters": sum(p.numel() for p in engine.model.parameters()),
    }


def main() -> int:
    out = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    result = {"world": world, "budgets": {str(budget): run(budget, world) for budget in (1.0, 8)}}
    with open(f"{out}.rank{rank}.json", "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    leave_process_group()  # a rank exiting while another still runs aborts gloo's teardown
    return 0


if __name__ == "__main__":
    sys.exit(main())

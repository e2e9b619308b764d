"""Greedy tokens and filter-layer selections of a tiny random Llama under OmniKV, weights plain or under ZeRO-Inference.

``python tests/scripts/zero_generate.py OUT`` writes ``OUT.json``: for ``offload_weights`` false and
true (DeepSpeed ZeRO stage 3, parameters offloaded to host memory), at budgets 1.0 and 8 tokens, the
tokens of ``engine.generate``, each filter layer's selected indices per decode step, how the
weights are held (elements per parameter tensor as seen outside DeepSpeed's fetch) and why the
decode loop runs without a CUDA graph. Each configuration runs in a fresh model built from the same seed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' shared helpers
from okv_testlib import make_model  # noqa: E402

import omnikv_runtime as okv
from omnikv_runtime.listeners import SelectionRecorder

NEW_TOKENS = 12


def spy_on_initialize() -> dict:
    """Record whether every parameter was already partitioned when DeepSpeed's initialize got the model
    (its condition for leaving the model where it is instead of moving it to the GPU whole)."""
    import deepspeed

    seen: dict = {}
    real = deepspeed.initialize

    def initialize(*args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        seen["partitioned"] = all(hasattr(param, "ds_id") for param in model.parameters())
        return real(*args, **kwargs)

    deepspeed.initialize = initialize
    return seen


def run(offload: bool, budget: float | int) -> dict:
    seen = spy_on_initialize() if offload else {}
    model = make_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=6)
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    engine = okv.initialize(
        model,
        {
            "omnikv": {"filter_layers": [1, 3], "wait_layers": 1, "token_budget": budget},
            "offload": {"device": "cpu"},
            "prefill": {"chunk_size": 16},
            "distributed": {"offload_weights": offload},
        },
    )
    trace = SelectionRecorder(contexts=False)
    with engine.listening(trace):
        tokens = engine.generate(ids, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    selections: dict[str, list] = {}
    for event in trace.records:
        selections.setdefault(str(event.layer), []).append(event.indices.tolist())
    q_proj = engine.model.model.layers[0].self_attn.q_proj.weight
    return {
        "tokens": tokens.tolist(),
        "selections": selections,
        "q_proj_elements_at_rest": q_proj.numel(),
        "zero_partitioned": hasattr(q_proj, "ds_tensor"),
        "partitioned_before_initialize": seen.get("partitioned"),
        "graph_blocker": engine.graph_blocker(),
        "fused_layers": engine.fused_layers,
    }


def main() -> int:
    result = {str(offload): {str(budget): run(offload, budget) for budget in (1.0, 8)} for offload in (False, True)}
    with open(f"{sys.argv[1]}.json", "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())

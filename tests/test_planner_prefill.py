"""The planner's prefill term: a sparse layer's chunk reads its earlier tokens back in blocks, so the
longest context with a chunked prefill is about the decode-only one."""

from __future__ import annotations

import omnikv_runtime as okv
from omnikv_runtime.planner import KNOWN_GEOMETRIES, ModelGeometry, plan_memory
from omnikv_runtime.planner.fit import longest_context

LLAMA3_8B = ModelGeometry.from_hf_config(KNOWN_GEOMETRIES["llama3-8b"])
CARD, HOST = 80 * 10**9, 512 * 10**9


def _config(**prefill):
    return okv.load_config(
        {
            "model": {"dtype": "bfloat16"},
            "omnikv": {"filter_layers": [2, 8, 18], "wait_layers": 1, "token_budget": 2048},
            "offload": {"device": "cpu"},
            "prefill": {"chunk_size": 4096, **prefill},
        }
    )


def test_longest_context_with_prefill_is_close_to_decode_only_on_an_80gb_card():
    config = _config()
    with_prefill = longest_context(LLAMA3_8B, config, 1, 128, CARD, HOST)
    decode_only = longest_context(LLAMA3_8B, config, 1, 128, CARD, HOST, prefill=False)
    assert decode_only["context"] > 1_500_000  # the GPU's dense layers limit it, not the host's 512 GB
    assert with_prefill["context"] >= 0.9 * decode_only["context"]
    assert with_prefill["limited_by"] == "gpu"


def test_sparse_layers_prefill_term_counts_blocks_not_the_context():
    config = _config(read_block_tokens=4096)
    short, long = (plan_memory(LLAMA3_8B, config, context, 1, 128) for context in (200_000, 1_600_000))
    assert short.activations["prefill"] == long.activations["prefill"]  # nothing grows with the context
    # larger blocks cost more: four blocks (two read, one being read, a copy) of 8 KV heads x 128 x 2 (K, V) x bf16
    bigger = plan_memory(LLAMA3_8B, _config(read_block_tokens=65536), 1_600_000, 1, 128)
    assert bigger.activations["prefill"] - long.activations["prefill"] == 4 * (65536 - 4096) * 4096


def test_a_batch_that_may_be_padded_still_counts_the_mask():
    config = _config()
    short, long = (plan_memory(LLAMA3_8B, config, context, 2, 128) for context in (200_000, 400_000))
    mask_and_repeated_kv = 2 * (4096 * 200_000 * 3 + 2 * 32 * 200_000 * 128 * 2)  # two rows, 200,000 more columns
    assert long.activations["prefill"] - short.activations["prefill"] == mask_and_repeated_kv

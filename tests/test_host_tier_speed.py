"""Which host tier (the model's dtype or FP8) would make a decode step faster: reported, never applied.

The bytes a step moves are each sparse layer's selected rows plus the new token's row written back:
for Llama-3-8B (24 sparse layers with `configs/llama3_8b.json`) at a budget of 2,048 that is 201.4 MB
in bfloat16 and 103.9 MB in FP8, the figures the decode benchmark measured crossing PCIe.
"""

from __future__ import annotations

import json

import pytest
import torch
from okv_testlib import PAD, SPARSE_LAYERS, make_model, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime.cli import main
from omnikv_runtime.planner import KNOWN_GEOMETRIES, ModelGeometry
from omnikv_runtime.planner.host_tier import (
    DEFAULT_HOST_TO_DEVICE,
    compare_host_tiers,
    decode_step_bytes,
    describe_host_tiers,
    host_to_device_bandwidth,
)
from omnikv_runtime.profiling.run_report import run_lines, summarize_run

LLAMA3_8B = ModelGeometry.from_hf_config(KNOWN_GEOMETRIES["llama3-8b"])
BF16_ROW, FP8_ROW = 2 * 8 * 128 * 2, 2 * 8 * 128 + 2 * 8 * 4  # one token of one layer: K and V (FP8: + scales)


def _llama3_config(**offload):
    """The bundled `llama3_8b` config, with ``offload`` settings changed."""
    data = okv.load_config("llama3_8b").to_dict()
    data["offload"].update(offload)
    return okv.load_config(data)


def test_step_bytes_are_the_selected_rows_and_the_write_back_of_each_sparse_layer():
    config = _llama3_config()
    assert decode_step_bytes(LLAMA3_8B, config, 1, 131072, "auto") == 24 * 2049 * BF16_ROW == 201_424_896
    assert decode_step_bytes(LLAMA3_8B, config, 1, 131072, "float8_e4m3fn") == 24 * 2049 * FP8_ROW == 103_859_712
    assert decode_step_bytes(LLAMA3_8B, config, 3, 131072, "auto") == 3 * 201_424_896
    assert decode_step_bytes(LLAMA3_8B, config, 1, 1000, "auto") == 24 * 1001 * BF16_ROW  # a budget past the context
    config.distributed.tp_size = 2  # each rank's link carries its own half of the KV heads
    assert decode_step_bytes(LLAMA3_8B, config, 1, 131072, "auto") == 201_424_896 // 2


def test_the_comparison_names_the_faster_tier_with_its_numbers_and_keeps_the_config():
    config = _llama3_config()
    comparison = compare_host_tiers(LLAMA3_8B, config, 1, 131072, 40e9, "a figure for the test")
    assert comparison["faster"] == "float8_e4m3fn" and comparison["configured"] == "auto"
    assert comparison["tiers"]["auto"] == {"bytes_per_step": 201_424_896, "step_floor_ms": 201_424_896 / 40e9 * 1e3}
    assert comparison["tiers"]["float8_e4m3fn"]["step_floor_ms"] == pytest.approx(2.5965, abs=1e-4)
    text = describe_host_tiers(comparison)
    for figure in ("103.9 MB", "201.4 MB", "floor 2.60 ms", "floor 5.04 ms", "40.0 GB/s (a figure for the test"):
        assert figure in text
    assert "the model's dtype (bfloat16)" in text and 'offload.host_dtype = "float8_e4m3fn"' in text
    assert config.offload.host_dtype == "auto"  # reported, not applied
    fp8 = _llama3_config(device="cpu", host_dtype="float8_e4m3fn")
    assert describe_host_tiers(compare_host_tiers(LLAMA3_8B, fp8, 1, 131072, 40e9, "x")).endswith("configured one.")


def test_no_comparison_without_a_host_tier():
    assert compare_host_tiers(LLAMA3_8B, _llama3_config(device="none"), 1, 4096, 40e9, "x") is None
    dense = _llama3_config()
    dense.omnikv.enabled = False
    assert compare_host_tiers(LLAMA3_8B, dense, 1, 4096, 40e9, "x") is None


def test_without_cuda_the_bandwidth_is_the_planners_default_and_says_so():
    bandwidth, source = host_to_device_bandwidth(torch.device("cpu"))
    assert bandwidth == DEFAULT_HOST_TO_DEVICE and "default" in source and "no CUDA device" in source


def test_plan_reports_the_faster_host_tier(capsys):
    argv = ["plan", "--config", "llama3_8b", "--context", "4096", "--gpu-memory", "80GB", "--host-memory", "512GB"]
    assert main([*argv, "--json"]) == 0
    speed = json.loads(capsys.readouterr().out)["omnikv"]["host_tier_speed"]
    assert speed["faster"] == "float8_e4m3fn" and speed["tiers"]["auto"]["bytes_per_step"] == 24 * 2049 * BF16_ROW
    assert main(argv) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Host tier speed: float8_e4m3fn would be the faster host tier for batch 1 x 4,096 tokens" in text
    assert "201.4 MB with the model's dtype (bfloat16)" in text and "50.0 GB/s (the planner's default figure" in text


def test_the_run_report_says_which_host_tier_would_be_faster():
    ids, mask = make_prompt(2)
    engine = okv.initialize(make_model("llama"), omni(budget=8))
    engine.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)
    run = summarize_run(engine, ids.shape[1], "")
    speed = run["host_tier_speed"]
    row = 2 * 2 * 16 * 4  # the tiny model's K and V: 2 KV heads x head dim 16, float32
    assert speed["tiers"]["auto"]["bytes_per_step"] == 2 * len(SPARSE_LAYERS) * (8 + 1) * row
    assert speed["model_dtype"] == "float32" and speed["faster"] == "float8_e4m3fn"
    text = " ".join("\n".join(run_lines("omnikv", run)).split())
    assert "host tier speed float8_e4m3fn would be the faster host tier for batch 2 x 40 tokens" in text
    assert json.loads(json.dumps(run)) == run

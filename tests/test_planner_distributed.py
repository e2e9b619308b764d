"""The planner with tensor parallelism (figures per GPU) and ZeRO-Inference (weights in host memory), by hand."""

from __future__ import annotations

import json

import pytest

import omnikv_runtime as okv
from omnikv_runtime.cli import main
from omnikv_runtime.errors import ConfigError
from omnikv_runtime.planner import KNOWN_GEOMETRIES, ModelGeometry, plan_memory
from omnikv_runtime.planner.fit import describe_shortfall, longest_context

LLAMA3 = ModelGeometry.from_hf_config(KNOWN_GEOMETRIES["llama3-8b"])
GPU_TIERS = ("gpu_dense", "gpu_selected", "gpu_tail", "gpu_hot", "gpu_hot_state", "host_allocated", "host_reserved")


def _config(**distributed):
    return okv.load_config({"model": {"dtype": "bfloat16"}, "offload": {"device": "cpu"}, "distributed": distributed})


def test_two_gpus_each_hold_half_the_kv_and_their_share_of_the_weights():
    one = plan_memory(LLAMA3, _config(), 131072, batch=4, new_tokens=32)
    two = plan_memory(LLAMA3, _config(tp_size=2), 131072, batch=4, new_tokens=32)
    for tier in GPU_TIERS:
        assert two.tiers[tier] * 2 == one.tiers[tier], tier
    assert two.host_per_rank * 2 == two.host == one.host  # two tiers of half the heads on one host
    # by hand, bf16: embeddings whole (128256 x 4096), the LM head split along the hidden size, each layer's
    # projections halved (q, o 4096 x 4096; k, v 1024 x 4096; gate, up, down 4096 x 14336), norms whole
    layer = (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336) // 2 + 2 * 4096
    assert two.weights == 2 * (128256 * 4096 + 128256 * 2048 + 32 * layer + 4096)
    assert two.tp_size == 2 and two.gpu < one.gpu


def test_more_gpus_fit_a_longer_context():
    limits = {}
    for tp in (1, 2):
        config = _config(tp_size=tp)
        limits[tp] = longest_context(LLAMA3, config, 1, 32, 80 * 10**9, 2 * 10**12, prefill=False)
    assert limits[2]["context"] > 1.9 * limits[1]["context"]
    assert limits[1]["limited_by"] == limits[2]["limited_by"] == "gpu"


def test_tp_size_that_does_not_split_the_kv_heads_is_refused():
    with pytest.raises(ConfigError, match=r"distributed.tp_size.*3.*8 KV heads and 32 attention heads.*\[1, 2, 4, 8\]"):
        plan_memory(LLAMA3, _config(tp_size=3), 4096)


def test_zero_inference_keeps_the_weights_on_the_host():
    plain = plan_memory(LLAMA3, _config(), 32768, new_tokens=16)
    zero = plan_memory(LLAMA3, _config(offload_weights=True), 32768, new_tokens=16)
    assert zero.weights_offloaded and zero.weights_host == plain.weights == 8_030_261_248 * 2
    # on the GPU at a time: the larger of one layer and the embeddings (the LM head's size), the prefetch
    # bucket (two 4096 x 4096) and the norms kept resident
    assert zero.weights == 2 * (128256 * 4096 + 2 * 4096 * 4096 + 65 * 4096)
    assert zero.host == plain.host + zero.weights_host
    assert zero.gpu == plain.gpu - plain.weights + zero.weights
    message = describe_shortfall(zero, _config(offload_weights=True), 1, 1)
    assert "in flight" in message and "weights 16.06 GB" in message
    assert "offload_weights" in describe_shortfall(plain, _config(), 1, 10**15)  # suggested when the GPU is short


def test_cli_plan_reports_per_gpu(capsys):
    args = ["plan", "--model-config", "llama3-8b", "--context", "4096", "--dtype", "bfloat16", "--gpu-memory", "80GB"]
    assert main([*args, "--tp-size", "2", "--host-memory", "512GB"]) == 0
    text = capsys.readouterr().out
    assert "Tensor parallel over 2 GPUs" in text and "4 of 8 KV heads" in text and "on 2 GPUs" in text
    assert "host per rank (pinned)" in text and "GPU total per GPU" in text
    assert main([*args, "--offload-weights", "--host-memory", "512GB"]) == 0
    assert "weights on host (pinned)" in capsys.readouterr().out
    assert main([*args, "--tp-size", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tp_size"] == 2 and report["omnikv"]["tp_size"] == 2
    assert main([*args, "--tp-size", "5"]) != 0
    assert "'distributed.tp_size' = 5 is not allowed: a divisor of the model's 8 KV heads" in capsys.readouterr().err

"""ZeRO-Inference (DeepSpeed ZeRO stage 3, weights offloaded to host memory) beside OmniKV's KV offload, on CPU.

A plain `python` run of tests/scripts/zero_generate.py builds the same tiny random Llama twice,
once as is and once under ``distributed.offload_weights``: DeepSpeed partitions every parameter
(an empty placeholder at rest, fetched by its hooks when the module runs), and the tokens and the
selected indices per filter layer and step are those of the plain model, at full budget and at 8
of 40 tokens. Errors and the eager decode loop are checked in process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from okv_testlib import make_model, omni

import omnikv_runtime as okv
from omnikv_runtime.config import load_config
from omnikv_runtime.engine import Engine
from omnikv_runtime.engine.patches import _fuse_layers
from omnikv_runtime.errors import ConfigError

SCRIPT = Path(__file__).parent / "scripts" / "zero_generate.py"


def test_offloaded_weights_give_the_same_tokens_and_selections(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path / "zero")], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads((tmp_path / "zero.json").read_text())
    for budget in ("1.0", "8"):
        plain, offloaded = result["False"][budget], result["True"][budget]
        assert not plain["zero_partitioned"] and plain["q_proj_elements_at_rest"] == 128 * 128
        assert offloaded["zero_partitioned"] and offloaded["q_proj_elements_at_rest"] == 0  # fetched only to run
        # partitioned into host memory before DeepSpeed's initialize, which otherwise moves the whole model
        # to the GPU first (weights larger than the GPU then fail there)
        assert offloaded["partitioned_before_initialize"] is True
        assert offloaded["tokens"] == plain["tokens"]
        assert offloaded["selections"] == plain["selections"] and offloaded["selections"]
        assert offloaded["fused_layers"] is False
    assert result["True"]["8"]["tokens"] != result["True"]["1.0"]["tokens"]  # the budget selects something
    assert len(result["True"]["8"]["selections"]["3"][0][0]) == 8


def test_offload_weights_without_deepspeed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(ConfigError, match=r"distributed.offload_weights.*pip install omnikv-runtime\[deepspeed\]"):
        okv.initialize(make_model("llama"), {**omni(8), "distributed": {"offload_weights": True}})


def test_offload_weights_with_tensor_parallelism_is_refused():
    with pytest.raises(ConfigError, match=r"distributed.offload_weights.*tp_size = 2.*not both"):
        okv.initialize(make_model("llama"), {**omni(8), "distributed": {"offload_weights": True, "tp_size": 2}})


def test_offload_weights_is_a_strict_bool():
    with pytest.raises(ConfigError, match="offload_weights"):
        load_config({"distributed": {"offload_weights": "yes"}})


def test_fused_layers_step_aside_for_offloaded_weights():
    model = make_model("llama")
    assert _fuse_layers(model, torch.device("cuda"), "auto", weights_offloaded=True) is False
    with pytest.raises(ConfigError, match=r"generation.fused_layers.*offload_weights"):
        _fuse_layers(model, torch.device("cuda"), True, weights_offloaded=True)


def test_offloaded_weights_decode_without_a_cuda_graph():
    config = load_config({"distributed": {"offload_weights": True}})
    policy = SimpleNamespace(graph_safe=True)
    fake = SimpleNamespace(device=torch.device("cuda"), config=config, policy=policy)
    assert "DeepSpeed's weight fetches" in Engine.graph_blocker(fake)
    fake.config = load_config({})
    assert Engine.graph_blocker(fake) is None


def test_zeros_bf16_cast_leaves_the_rotary_frequencies_in_float32(monkeypatch):
    # DeepSpeed's bf16 mode casts the whole module, buffers included; the rotary frequencies go back to
    # float32 (in bf16 the angles at long positions are off by radians)
    from omnikv_runtime import distributed

    def initialize(model, config):
        return SimpleNamespace(module=model.to(torch.bfloat16)), None, None, None

    fake = SimpleNamespace(initialize=initialize, zero=SimpleNamespace(Init=lambda **kwargs: None))
    monkeypatch.setattr(distributed, "_import_deepspeed", lambda *args: fake)
    monkeypatch.setattr(distributed, "_join_single_rank", lambda deepspeed, backend: None)
    model = make_model("llama")
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    before = {name: buffer.clone() for name, buffer in model.named_buffers() if buffer.dtype == torch.float32}
    assert any(name.endswith("inv_freq") for name in before)
    offloaded = distributed.offload_weights(model, load_config({"distributed": {"offload_weights": True}}))
    after = dict(offloaded.named_buffers())
    for name, buffer in before.items():
        assert after[name].dtype == torch.float32 and torch.equal(after[name], buffer), name

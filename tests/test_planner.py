"""The memory planner against what the engine really allocates (CPU, tiny models, exact)."""

from __future__ import annotations

import pytest
import torch
from okv_testlib import FAMILIES, PAD, capture_caches, make_model, make_prompt, omni
from torch.utils._python_dispatch import TorchDispatchMode

import omnikv_runtime as okv
from omnikv_runtime.cli import main
from omnikv_runtime.layout import reserve_tokens, tail_ring_tokens
from omnikv_runtime.planner import KNOWN_GEOMETRIES, ModelGeometry, parse_bytes, plan_memory
from omnikv_runtime.planner.fit import dense_twin, describe_shortfall, fits, longest_context

TIER_KEYS = ("gpu_dense", "gpu_selected", "gpu_tail", "gpu_hot", "host", "host_allocated")


@pytest.mark.parametrize("family", FAMILIES)
def test_parameter_count_matches_the_model(family):
    model = make_model(family)
    assert ModelGeometry.from_hf_config(model.config).param_count() == model.num_parameters()


def test_llama3_8b_geometry():
    geometry = ModelGeometry.from_hf_config(KNOWN_GEOMETRIES["llama3-8b"])
    assert geometry.param_count() == 8_030_261_248  # Meta-Llama-3-8B's published parameter count
    assert geometry.kv_row_bytes(2) == 4096  # 2 x 8 KV heads x 128 x bf16


@pytest.mark.parametrize(
    ("batch", "new_tokens", "budget", "chunk", "hot"),
    [(1, 6, 10, None, 0), (2, 9, 0.25, 16, 0), (2, 1, 12, 7, 0), (1, 40, 5, 16, 0), (2, 7, 6, 16, 12)],
)
def test_tiers_equal_what_the_cache_allocates(batch, new_tokens, budget, chunk, hot):
    model = make_model("llama")
    config = okv.load_config(omni(budget, prefill={"chunk_size": chunk}, offload={"hot_cache_tokens": hot}))
    engine = okv.initialize(model, config)
    caches = capture_caches(engine)
    ids, mask = make_prompt(batch)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, pad_token_id=PAD)
    assert out.shape[1] == ids.shape[1] + new_tokens
    allocated = caches[-1].tier_bytes()
    plan = plan_memory(ModelGeometry.from_hf_config(model.config), config, ids.shape[1], batch, new_tokens)
    assert allocated["host"] > 0 and allocated["gpu_dense"] > 0 and (allocated["gpu_hot"] > 0) == (hot > 0)
    assert {key: plan.tiers[key] for key in TIER_KEYS} == {key: allocated[key] for key in TIER_KEYS}
    # and from geometry by hand: 5 dense layers x the reserve (prompt + new, rounded up to 256) tokens x
    # 2 KV heads x 16 x K,V x float32
    assert plan.tiers["gpu_dense"] == 5 * batch * 256 * 2 * 16 * 2 * 4


def test_dense_config_plans_every_layer_on_the_gpu():
    model = make_model("qwen3")  # head_dim 32 != hidden / heads
    config = okv.load_config({"omnikv": {"enabled": False}})
    engine = okv.initialize(model, config)
    caches = capture_caches(engine)
    ids, mask = make_prompt(1)
    engine.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=PAD)
    plan = plan_memory(ModelGeometry.from_hf_config(model.config), config, ids.shape[1], 1, 4)
    assert plan.tiers["gpu_dense"] == caches[-1].tier_bytes()["gpu_dense"] == 8 * 256 * 2 * 32 * 2 * 4
    assert plan.tiers["host_allocated"] == plan.host == 0


def test_reserve_rounds_up_and_the_ring_holds_the_new_tokens():
    assert reserve_tokens(40, 12) == 256 and reserve_tokens(256, 0) == 256 and reserve_tokens(256, 1) == 512
    assert reserve_tokens(131072, 16) == 131328  # nearby lengths share a cache shape (and a captured step)
    assert tail_ring_tokens(None, 256, 40) == 216  # every reserved new token has a slot
    assert tail_ring_tokens(None, 256, 250) == 16  # at least 16
    assert tail_ring_tokens(64, 131328, 131072) == 64  # omnikv.tail_tokens bounds it


def test_fits_and_longest_context_are_consistent():
    config = okv.load_config("llama3_8b")
    geometry = ModelGeometry.from_hf_config(KNOWN_GEOMETRIES["llama3-8b"])
    gpu, host = parse_bytes("80GB"), parse_bytes("512GiB")
    for variant in (config, dense_twin(config)):
        longest = longest_context(geometry, variant, 1, 16, gpu, host)["context"]
        assert fits(plan_memory(geometry, variant, longest, 1, 16), gpu, host)["all"]
        assert not fits(plan_memory(geometry, variant, longest + 1, 1, 16), gpu, host)["all"]
    omni_plan = plan_memory(geometry, config, 131072, 1, 16)
    dense_plan = plan_memory(geometry, dense_twin(config), 131072, 1, 16)
    reserve = reserve_tokens(131072, 16)
    assert dense_plan.tiers["gpu_dense"] == 32 * reserve * 4096
    assert omni_plan.tiers["gpu_dense"] == 8 * reserve * 4096  # layers 0-3, 8, 9, 18, 19
    assert omni_plan.tiers["host_allocated"] == 24 * reserve * 4096
    assert omni_plan.gpu < dense_plan.gpu


def test_shortfall_message_names_what_to_change():
    config = okv.load_config({**omni(64), "offload": {"device": "none"}})
    geometry = ModelGeometry.from_hf_config(KNOWN_GEOMETRIES["llama3-8b"])
    plan = plan_memory(geometry, config, 500_000, 4, 8, dtype="bfloat16")
    message = describe_shortfall(plan, config, parse_bytes("80GB"), parse_bytes("1TB"))
    for hint in ("lower the batch", "offload.device = 'cpu'", "omnikv.filter_layers", "token_budget"):
        assert hint in message
    assert describe_shortfall(plan_memory(geometry, config, 1000, 1, 8), config, 10**12, 10**12) is None


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes(1024) == 1024
    with pytest.raises(okv.ConfigError, match="--gpu-memory"):
        parse_bytes("eighty", "--gpu-memory")


def test_plan_cli_json(capsys, tmp_path):
    import json

    argv = ["plan", "--config", "llama3_8b", "--context", "32768", "--gpu-memory", "80GB", "--host-memory", "512GB"]
    assert main([*argv, "--json"]) == 1  # exit status 1: the run does not fit
    report = json.loads(capsys.readouterr().out)
    assert report["model"]["parameters"] == 8_030_261_248
    # the memory holds 32K tokens, but Llama-3-8B has 8,192 positions: the run does not fit the model
    assert report["omnikv"]["fits"] == {"gpu": True, "host": True, "positions": False, "all": False}
    assert report["dense"]["fits"]["gpu"] and not report["dense"]["fits"]["all"]
    # the same geometry with a longer position limit (a long-context variant) fits, with OmniKV further
    geometry = tmp_path / "config.json"
    geometry.write_text(json.dumps({**KNOWN_GEOMETRIES["llama3-8b"], "max_position_embeddings": 1 << 24}))
    assert main([*argv, "--model-config", str(geometry), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["omnikv"]["fits"]["all"] and report["dense"]["fits"]["all"]
    assert report["omnikv"]["longest_context"]["context"] > report["dense"]["longest_context"]["context"]


def test_plan_cli_bad_model_config(capsys):
    assert main(["plan", "--context", "10", "--model-config", "/nonexistent/x.json"]) == 2
    assert "--model-config" in capsys.readouterr().err


class _TensorOps(TorchDispatchMode):
    """Records every tensor operation (allocations included) run while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_planning_runs_no_tensor_operation():
    """The planner computes sizes from the geometry alone: no tensor is created, let alone allocated."""
    geometry = ModelGeometry.from_hf_config(KNOWN_GEOMETRIES["smollm2-135m"])
    config = okv.load_config("default")
    with _TensorOps() as seen:
        plan = plan_memory(geometry, config, 1000)
        fits(plan, 2**34, 2**34)
        longest = longest_context(geometry, config, 1, 32, 2**34, 2**34)
    assert seen.ops == [] and plan.tiers["host"] > 0 and longest["context"] > 1000
    with _TensorOps() as control:  # the recorder sees what would break the rule
        torch.empty(plan.tiers["host"] // 1024, dtype=torch.uint8)
    assert control.ops == ["aten.empty.memory_format"]

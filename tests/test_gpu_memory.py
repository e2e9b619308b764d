"""GPU checks of the memory planner and profiler (run with ``pytest -m gpu`` on a CUDA machine)."""

from __future__ import annotations

import pytest
import torch
from okv_testlib import PAD, make_model, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime.config.sections import MAX_TOKENS
from omnikv_runtime.planner import ModelGeometry, plan_memory

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_llama():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return make_model("llama", max_position_embeddings=10**9).to("cuda")


def test_initialize_refuses_a_context_that_cannot_fit():
    # the longest context a config may name (16,777,216 tokens) at 64 KiB of KV a token: about 1.1 TB
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    wide = make_model(
        "llama", max_position_embeddings=10**9, hidden_size=1024, num_attention_heads=16, num_key_value_heads=16
    ).to("cuda")
    config = omni(8, model={"max_context_len": MAX_TOKENS}, offload={"device": "none"})
    with pytest.raises(okv.PromptError, match="does not fit") as error:
        okv.initialize(wide, config)
    assert "offload.device = 'cpu'" in str(error.value) and "omnikv.filter_layers" in str(error.value)


def test_generate_refuses_before_allocating(cuda_llama):
    engine = okv.initialize(cuda_llama, omni(8))
    ids, mask = make_prompt(1)
    before = torch.cuda.memory_allocated()
    with pytest.raises(okv.PromptError, match="does not fit"):  # 5 dense layers x 5e8 tokens: ~640 GB
        engine.generate(ids, attention_mask=mask, max_new_tokens=5 * 10**8, pad_token_id=PAD)
    assert torch.cuda.memory_allocated() == before


def test_tiers_and_pinned_bytes_match_the_plan_on_cuda(cuda_llama, tmp_path):
    config = okv.load_config(omni(8, prefill={"chunk_size": 16}))
    engine = okv.initialize(cuda_llama, config)
    ids, mask = make_prompt(2)
    with okv.profile_memory(engine, out_dir=tmp_path, config={"trace": False, "png": False}) as prof:
        engine.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=6, pad_token_id=PAD)
    plan = plan_memory(ModelGeometry.from_hf_config(cuda_llama.config), config, ids.shape[1], 2, 6)
    cache = engine.last_cache
    tiers = cache.tier_bytes()
    for key in ("gpu_dense", "gpu_selected", "gpu_tail", "host", "host_allocated"):
        assert plan.tiers[key] == tiers[key], key
    report = prof.report()
    assert report["summary"]["peak_pinned"] == tiers["host_allocated"]  # the host tier is pinned
    assert all(check["match"] for check in report["engines"][0]["geometry_check"].values())
    assert report["summary"]["peak_gpu"]["0"]["max_allocated"] > 0


@pytest.mark.parametrize("offload", ["cpu", "none"])
def test_omnikv_profile_with_graphs_on_reports_the_tiers_of_a_run_with_graphs_off(offload, tmp_path, capsys):
    """The profiler observes through the engine's listeners, which are silent while a step records:
    profiling a run whose decode steps are recorded and replayed works and sees the same tiers."""
    import json

    from omnikv_runtime.cli import main

    model_config = tmp_path / "config.json"
    model_config.write_text(make_model("llama").config.to_json_string())
    results = {}
    for graphs in (True, False):
        config = tmp_path / f"omni_{graphs}.json"
        sections = {"profiling": {"trace": False, "png": False}, "generation": {"cuda_graphs": graphs}}
        config.write_text(json.dumps(omni(8, offload={"device": offload}, **sections)))
        args = ["profile", "--config", str(config), "--random-weights", "--model-config", str(model_config)]
        args += ["--device", "cuda", "--prompt-tokens", "48", "--max-new-tokens", "12"]
        assert main([*args, "--out", str(tmp_path / f"p_{graphs}"), "--json"]) == 0
        results[graphs] = json.loads(capsys.readouterr().out)
    on, off = results[True], results[False]
    assert on["summary"]["decode_steps"] < off["summary"]["decode_steps"] == 11  # replayed steps leave no mark
    for result in (on, off):
        assert all(check["match"] for check in result["geometry_check"].values())
    assert {t: c["reported"] for t, c in on["geometry_check"].items()} == {
        t: c["reported"] for t, c in off["geometry_check"].items()
    }


def test_a_recording_that_fails_leaves_cuda_usable(caplog):
    """A step that synchronizes cannot be captured: the recording fails, is logged, the step runs
    eagerly, and the process goes on (random numbers, a later recording and its replays)."""
    import logging

    from omnikv_runtime.decode.graph import CudaGraphRecorder, GraphedStep
    from omnikv_runtime.transfer import make_transfer_engine

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda", torch.cuda.current_device())
    steps = GraphedStep(CudaGraphRecorder(device), make_transfer_engine(device, "none", False), warmup=1)
    source = torch.randn(1024, device=device)
    out = torch.full_like(source, float("nan"))
    broken = []

    def synchronizing_step() -> None:
        out.copy_(source * 3)
        torch.cuda.synchronize()  # not permitted while a stream captures
        broken.append(1)

    with caplog.at_level(logging.WARNING, logger="omnikv_runtime.decode.graph"):
        for _ in range(3):
            steps.run("broken", synchronizing_step)
    torch.cuda.synchronize()
    assert "recording the decode step failed" in caplog.text and steps.kept() == []
    assert torch.equal(out, source * 3) and len(broken) >= 3  # every step ran (eagerly)
    noise = torch.rand(1024, device=device)  # the generator left its capture state
    assert 0 <= float(noise.min()) and float(noise.max()) < 1

    def step() -> None:
        out.copy_(source + torch.rand_like(source) * 0)

    for shift in range(4):
        out.fill_(float("nan"))
        source.add_(shift)
        steps.run("fine", step)
        torch.cuda.synchronize()
        assert torch.equal(out, source), shift
    assert steps.kept() == ["fine"] and steps.times.replays == 3

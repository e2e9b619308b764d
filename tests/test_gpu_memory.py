"""GPU checks of the memory planner and profiler (run with ``pytest -m gpu`` on a CUDA machine)."""

from __future__ import annotations

import pytest
import torch
from okv_testlib import PAD, make_model, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime.planner import ModelGeometry, plan_memory

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_llama():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return make_model("llama", max_position_embeddings=10**9).to("cuda")


def test_initialize_refuses_a_context_that_cannot_fit(cuda_llama):
    config = omni(8, model={"max_context_len": 2 * 10**9}, offload={"device": "none"})
    with pytest.raises(okv.PromptError, match="does not fit") as error:
        okv.initialize(cuda_llama, config)
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

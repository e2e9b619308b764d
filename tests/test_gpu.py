"""GPU checks of the core runtime (run with ``pytest -m gpu`` on a CUDA machine).

The same tiered cache with the compute device on CUDA: host tier in pinned CPU memory
(``offload.device = "cpu"``) or on the GPU (``"none"``); greedy tokens at a 100% budget equal
dense, and a small budget really keeps the sparse layers' KV off the GPU.
"""

from __future__ import annotations

import pytest
import torch
from okv_testlib import cuda_llama, cuda_prompt

import omnikv_runtime as okv

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_model():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return cuda_llama()


@pytest.mark.parametrize("transfer", ["triton", "torch"])
@pytest.mark.parametrize("offload", ["cpu", "none"])
@pytest.mark.parametrize("batch", [1, 2])
def test_full_budget_equals_dense_on_cuda(cuda_model, offload, batch, transfer):
    ids, mask = cuda_prompt(batch, 300, pad=37)
    with torch.no_grad():
        reference = cuda_model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    config = {
        "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 1.0},
        "offload": {"device": offload, "transfer": transfer},
        "prefill": {"chunk_size": 128},
    }
    engine = okv.initialize(cuda_model, config)
    assert engine.transfer.name == transfer
    output = engine.generate(ids, attention_mask=mask, max_new_tokens=32, pad_token_id=0)
    assert torch.equal(output, reference)


def test_small_budget_keeps_host_tier_off_gpu(cuda_model):
    ids, mask = cuda_prompt(2, 300, pad=37)
    config = {"omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 16}, "offload": {"device": "cpu"}}
    engine = okv.initialize(cuda_model, config)
    output = engine.generate(ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0)
    assert output.shape == (2, 316)
    cache = engine.last_cache
    for arena in cache.tiers.arenas:
        assert arena.data.device.type == "cpu"
        assert arena.data.is_pinned()
        assert arena.lengths == [300 + 15] * len(arena.lengths)
    for segment in cache.tiers.segments:  # on the GPU: the 16 selected rows and the tail ring, no more
        assert segment.staging.device.type == "cuda" and segment.staging.shape[:2] == (2, 16)
        assert segment.ring.device.type == "cuda" and segment.ring.shape[1] >= 15
    assert engine.transfer.name == "triton"  # "auto" on CUDA
    stats = engine.stats()
    assert all(steps == [16] * 15 for steps in stats["selected_per_step"].values())
    assert stats["transfer"]["bytes_fetched"] > 0
    report = engine.memory_report()
    assert report["gpu_peak_bytes"] > 0
    assert report["tiers"]["host"] == sum(a.used_bytes() for a in cache.tiers.arenas)


@pytest.mark.parametrize("row_elems", [128, 1024, 24576])
def test_triton_gather_reads_pinned_host_rows_exactly(row_elems):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from omnikv_runtime.transfer.triton_gather import gather_rows

    source = torch.randn(2, 3000, row_elems).to(torch.bfloat16).pin_memory()
    indices = torch.stack([torch.randperm(3000)[:257].sort().values for _ in range(2)]).cuda()
    out = torch.full((2, 257, row_elems), float("nan"), dtype=torch.bfloat16, device="cuda")
    gather_rows(source, indices, out)
    expected = source[torch.arange(2)[:, None], indices.cpu()]
    assert torch.equal(out.cpu(), expected)


def test_transfer_stream_has_no_race_over_100_steps(cuda_model):
    """100 decode steps with gathers on the side stream: the same tokens on every run and as the torch engine."""
    ids, mask = cuda_prompt(2, 600, pad=50)
    runs = []
    for transfer in ("triton", "triton", "triton", "torch"):
        config = {
            "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 32},
            "offload": {"device": "cpu", "transfer": transfer},
        }
        engine = okv.initialize(cuda_model, config)
        runs.append(engine.generate(ids, attention_mask=mask, max_new_tokens=100, pad_token_id=0))
    assert all(torch.equal(run, runs[0]) for run in runs[1:])


@pytest.mark.parametrize("eviction", ["lru", "lfu", "none"])
def test_hot_cache_on_cuda_gives_the_same_tokens_and_fetches_less(cuda_model, eviction):
    """Delta fetch through the GPU hot cache: same tokens as without it (triton and torch), fewer bytes."""
    ids, mask = cuda_prompt(2, 600, pad=50)
    runs, fetched = [], []
    for transfer, hot in (("triton", 0), ("triton", 64), ("torch", 64), ("triton", 64)):
        config = {
            "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 32},
            "offload": {"device": "cpu", "transfer": transfer, "hot_cache_tokens": hot, "eviction": eviction},
        }
        engine = okv.initialize(cuda_model, config)
        runs.append(engine.generate(ids, attention_mask=mask, max_new_tokens=60, pad_token_id=0))
        fetched.append(engine.stats()["transfer"])
    assert all(torch.equal(run, runs[0]) for run in runs[1:])
    assert fetched[1]["hot_hits"] > 0
    assert fetched[1]["bytes_fetched"] + fetched[1]["hot_bytes_saved"] == fetched[0]["bytes_fetched"]
    assert fetched[1]["hot_hits"] == fetched[2]["hot_hits"] == fetched[3]["hot_hits"]


def test_triton_hot_gather_matches_the_source_exactly_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from omnikv_runtime.policies import LRUEviction
    from omnikv_runtime.transfer import HotCache
    from omnikv_runtime.transfer.triton_gather import gather_rows

    source = torch.randn(2, 4000, 24, 2, 8, 16).to(torch.bfloat16).pin_memory()
    hot = HotCache(LRUEviction(), 2, 300, source.shape[2:], torch.bfloat16, torch.device("cuda"), 4000)
    generator = torch.Generator().manual_seed(3)
    for _ in range(6):
        indices = torch.stack([torch.randperm(600, generator=generator)[:200].sort().values for _ in range(2)])
        host_rows, hot_slots = hot.plan(indices.cuda(), 4000)
        out = torch.full((2, 200, *source.shape[2:]), float("nan"), dtype=torch.bfloat16, device="cuda")
        gather_rows(source, host_rows, out, hot=hot.data, hot_slots=hot_slots)
        assert torch.equal(out.cpu(), source[torch.arange(2)[:, None], indices])
    assert 0 < int(hot.hits) < 6 * 400


def test_pageable_host_tier_still_gives_the_same_tokens(cuda_model, monkeypatch):
    """A failed pin falls back to pageable memory (a warning, a counter); the Triton engine gathers with torch."""
    ids, mask = cuda_prompt(2, 400, pad=30)
    config = {
        "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 32},
        "offload": {"device": "cpu", "transfer": "triton", "hot_cache_tokens": 64},
    }
    expected = okv.initialize(cuda_model, config).generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0)
    from omnikv_runtime.transfer import pinning

    # simulated: cudaHostRegister fails (cudaErrorMemoryAllocation), as when memory cannot be locked
    monkeypatch.setattr(pinning, "_cudart_register", lambda: (lambda pointer, size: 2, lambda pointer: 0))
    engine = okv.initialize(cuda_model, config)
    output = engine.generate(ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0)
    assert torch.equal(output, expected)
    assert engine.stats()["transfer"]["pinned_fallbacks"] >= 1
    assert all(not arena.data.is_pinned() for arena in engine.last_cache.tiers.arenas)

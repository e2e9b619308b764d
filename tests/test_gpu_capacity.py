"""GPU checks of exact pinning and the FP8 host tier (run with ``pytest -m gpu`` on a CUDA machine).

Exact pinning: a host tier is registered with CUDA at its exact size, the GPU reads and writes it
(Triton, UVA), and freeing it hands the memory back. The FP8 tier: the kernels on the GPU equal
the torch quantizer bit for bit (integer rounding), and a 100% budget over an FP8 tier gives what
dense gives with the sparse layers' prompt KV rounded to FP8.
"""

from __future__ import annotations

import gc

import psutil
import pytest
import torch
from okv_testlib import cache_keyword, capture_caches, cuda_llama, cuda_prompt

import omnikv_runtime as okv
from omnikv_runtime.transfer import HostArena, fp8, make_transfer_engine, pinning
from omnikv_runtime.transfer.host_arena import allocation_bytes

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
FP8 = torch.float8_e4m3fn
FP8_OFFLOAD = {"device": "cpu", "transfer": "triton", "host_dtype": "float8_e4m3fn"}


@pytest.fixture(scope="module")
def cuda_model():
    return cuda_llama()


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8)


@pytest.mark.parametrize("host_dtype", ["auto", "float8_e4m3fn"])
def test_exact_pinning_registers_the_tier_and_frees_it(host_dtype):
    engine = make_transfer_engine(torch.device("cuda"), "cpu", True, "triton", host_dtype)
    gc.collect()
    before = pinning.pinned_bytes()
    process = psutil.Process()
    resident = process.memory_info().rss  # this process's pages: steadier than the system's free memory
    tokens = 300_000  # 3 layers x 8 KV heads x 128: 3.7 GB in bf16, 1.9 GB in FP8 (+ scales)
    arena = HostArena(engine, 1, 3, 8, 128, torch.bfloat16, tokens)
    exact = allocation_bytes(1, tokens, 3, 8, 128, 2, host_dtype != "auto")
    assert pinning.pinned_bytes() - before == exact  # not rounded up to a power of two
    assert arena.data.is_pinned() and (arena.scales is None or arena.scales.is_pinned())
    assert process.memory_info().rss - resident > 0.9 * exact  # the pages are really taken
    # the GPU writes into and reads from the registered pages (Triton through UVA)
    keys = torch.randn(1, 8, 4000, 128, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    arena.append(2, keys, values)
    read_keys, read_values = arena.read(2, 4000)
    torch.cuda.synchronize()
    for got, written in ((read_keys, keys), (read_values, values)):
        if host_dtype != "auto":  # the FP8 round trip of what was written, bit for bit
            written = fp8.dequantize(*fp8.quantize(written), torch.bfloat16)
        assert torch.equal(got, written)
    held = process.memory_info().rss  # after the kernels ran (compiling them takes host memory too)
    del arena, read_keys, read_values
    gc.collect()
    assert pinning.pinned_bytes() == before
    assert held - process.memory_info().rss > 0.9 * exact  # handed back to the system


def test_fp8_kernels_on_the_gpu_equal_the_torch_quantizer():
    from omnikv_runtime.transfer.triton_gather import copy_row, gather_rows, scatter_rows

    engine = make_transfer_engine(torch.device("cuda"), "cpu", True, "triton", "float8_e4m3fn")
    torch.manual_seed(0)
    arena = HostArena(engine, 2, 4, 8, 128, torch.bfloat16, 1000)
    _as_bytes(arena.data).fill_(0x7F)
    arena.scales.fill_(float("nan"))
    # prefill write from strided GPU keys, then a decode write-back from a GPU ring
    keys = (torch.randn(2, 300, 8, 128, device="cuda") * 30).to(torch.bfloat16).transpose(1, 2)
    values = torch.randn(2, 8, 300, 128, device="cuda", dtype=torch.bfloat16)
    scatter_rows(arena.data, 1, 100, keys, values, scales=arena.scales)
    ring = (torch.randn(2, 16, 4, 2, 8, 128, device="cuda") * torch.logspace(-4, 4, 128, device="cuda")).bfloat16()
    copy_row(arena.data, torch.tensor([777], device="cuda"), ring, torch.tensor([5], device="cuda"), arena.scales)
    torch.cuda.synchronize()
    for part, kv in enumerate((keys, values)):
        codes, scales = fp8.quantize(kv.transpose(1, 2).cpu())
        assert torch.equal(_as_bytes(arena.data[:, 100:400, 1, part]), _as_bytes(codes))
        assert torch.equal(arena.scales[:, 100:400, 1, part], scales)
    codes, scales = fp8.quantize(ring[:, 5].cpu())
    assert torch.equal(_as_bytes(arena.data[:, 777]), _as_bytes(codes)) and torch.equal(arena.scales[:, 777], scales)
    assert (_as_bytes(arena.data[:, :100]) == 0x7F).all() and torch.isnan(arena.scales[:, 400:777]).all()
    # the gather dequantizes on the GPU, per layer slice, into bf16 staging
    arena.data[:, :, 3].view(torch.uint8).copy_(torch.randint(0, 0x7F, (2, 1000, 2, 8, 128), dtype=torch.uint8))
    arena.scales[:, :, 3] = 2.0 ** torch.randint(-20, 20, (2, 1000, 2, 8)).float()
    indices = torch.randint(0, 1000, (2, 200), device="cuda")
    staging = torch.full((2, 200, 4, 2, 8, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    gather_rows(arena.data[:, :, 3], indices, staging[:, :, 3], scales=arena.scales[:, :, 3])
    torch.cuda.synchronize()
    expected = fp8.dequantize(arena.data[:, :, 3], arena.scales[:, :, 3], torch.bfloat16)
    expected = expected[torch.arange(2)[:, None], indices.cpu()]
    assert torch.equal(staging[:, :, 3].cpu(), expected) and torch.isnan(staging[:, :, :3].float()).all()


def _fake_quantized_greedy(model, ids: torch.Tensor, sparse_layers: list[int], steps: int) -> torch.Tensor:
    """Dense greedy decoding with the sparse layers' prompt KV replaced by its FP8 round trip."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    keyword = cache_keyword(model)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=True, **{keyword: cache}).logits
        for layer in sparse_layers:
            for name in ("keys", "values"):
                stored = getattr(cache.layers[layer], name)
                stored.copy_(fp8.dequantize(*fp8.quantize(stored), stored.dtype))
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(steps - 1):
            logits = model(input_ids=tokens[-1], use_cache=True, **{keyword: cache}).logits
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat([ids, *tokens], dim=1)


@pytest.mark.parametrize("cuda_graphs", [True, False])
def test_full_budget_over_an_fp8_tier_equals_dense_with_fp8_prompt_kv(cuda_model, cuda_graphs):
    ids, _ = cuda_prompt(1, 300, pad=0)
    config = {
        "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 1.0},
        "offload": FP8_OFFLOAD,
        "prefill": {"chunk_size": None},
        "generation": {"cuda_graphs": cuda_graphs, "fused_layers": False},
    }
    engine = okv.initialize(cuda_model, config)
    caches = capture_caches(engine)
    output = engine.generate(ids, max_new_tokens=24, pad_token_id=0)
    reference = _fake_quantized_greedy(cuda_llama(), ids, engine.plan.sparse_layers, 24)  # a fresh copy: seed 0
    assert torch.equal(output, reference)
    stats = engine.stats()
    assert stats.get("cuda_graph") == cuda_graphs
    for arena in caches[-1].tiers.arenas:
        assert arena.data.dtype == FP8 and arena.data.is_pinned() and arena.lengths == [300 + 23] * len(arena.lengths)
    # 23 steps x 300 selected rows x 3 sparse layers x K,V x 2 KV heads x (32 codes + a float32 scale)
    assert stats["transfer"]["bytes_fetched"] == 23 * 300 * 3 * 2 * 2 * (32 + 4)


def test_fp8_tier_with_chunked_prefill_hot_cache_and_graph_matches_its_eager_run(cuda_model):
    ids, mask = cuda_prompt(2, 700, pad=41)
    config = {
        "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 48},
        "offload": {**FP8_OFFLOAD, "hot_cache_tokens": 96},
        "prefill": {"chunk_size": 256},
    }
    graphed = okv.initialize(cuda_model, config)
    output = graphed.generate(ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0)
    assert graphed.stats().get("cuda_graph") is True
    eager_config = {**config, "generation": {"cuda_graphs": False}}
    eager = okv.initialize(cuda_model, eager_config).generate(
        ids, attention_mask=mask, max_new_tokens=20, pad_token_id=0
    )
    assert torch.equal(output, eager)
    transfer = graphed.stats()["transfer"]
    assert transfer["bytes_prefill_read"] > 0 and transfer["hot_hits"] > 0
    assert transfer["pinned_fallbacks"] == 0


def test_failed_pinning_of_an_fp8_tier_falls_back_to_pageable_memory(cuda_model, monkeypatch):
    ids, mask = cuda_prompt(2, 400, pad=30)
    config = {"omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 32}, "offload": FP8_OFFLOAD}
    expected = okv.initialize(cuda_model, config).generate(ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0)
    monkeypatch.setattr(pinning, "_cudart_register", lambda: (lambda pointer, size: 2, lambda pointer: 0))
    engine = okv.initialize(cuda_model, config)
    caches = capture_caches(engine)
    output = engine.generate(ids, attention_mask=mask, max_new_tokens=16, pad_token_id=0)
    assert torch.equal(output, expected)  # the torch path dequantizes the same codes
    assert engine.stats()["transfer"]["pinned_fallbacks"] >= 1
    assert all(not arena.data.is_pinned() for arena in caches[-1].tiers.arenas)


def test_a_host_tier_larger_than_memory_is_refused_before_allocation(cuda_model, monkeypatch):
    monkeypatch.setattr(pinning, "pinnable_bytes", lambda: 1_000_000)
    before = pinning.pinned_bytes()
    engine = okv.initialize(cuda_model, {"omnikv": {"filter_layers": [1, 4], "token_budget": 16}})
    ids, mask = cuda_prompt(1, 3000, pad=0)
    with pytest.raises(okv.PromptError, match=r"needs .* GB of host memory.*offload\.host_dtype = 'float8_e4m3fn'"):
        engine.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    assert pinning.pinned_bytes() == before

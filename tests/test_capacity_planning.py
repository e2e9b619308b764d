"""Capacity on CPU: exact pinning (with a stand-in for cudart), the planner and profiler with an FP8
host tier, and the clear error for a host tier larger than the machine's memory."""

from __future__ import annotations

import gc
import json

import pytest
import torch
from okv_testlib import PAD, capture_caches, make_model, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime.cli import main
from omnikv_runtime.planner import KNOWN_GEOMETRIES, ModelGeometry, parse_bytes, plan_memory
from omnikv_runtime.planner.fit import describe_shortfall, longest_context
from omnikv_runtime.transfer import HostArena, TorchTransferEngine, pinning
from omnikv_runtime.transfer.host_arena import allocation_bytes

TIER_KEYS = ("gpu_dense", "gpu_selected", "gpu_tail", "gpu_hot", "host", "host_allocated")
FP8_OFFLOAD = {"host_dtype": "float8_e4m3fn"}


class FakeCudart:
    """Records registrations the way cudaHostRegister / cudaHostUnregister would see them."""

    def __init__(self, status: int = 0) -> None:
        self.status = status
        self.registered: dict[int, int] = {}
        self.events: list[tuple[str, int]] = []

    def register(self, pointer: int, size: int) -> int:
        self.events.append(("register", size))
        if self.status == 0:
            self.registered[pointer] = size
        return self.status

    def unregister(self, pointer: int) -> int:
        self.events.append(("unregister", self.registered.pop(pointer)))
        return 0


@pytest.fixture
def cudart(monkeypatch) -> FakeCudart:
    fake = FakeCudart()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pinning, "_cudart_register", lambda: (fake.register, fake.unregister))
    return fake


def _offload_engine(host_dtype=None) -> TorchTransferEngine:
    # a compute device other than the host's makes the engine offload (and pin)
    return TorchTransferEngine(
        torch.device("meta"), torch.device("cpu"), True, fetches_rows=True, host_dtype=host_dtype
    )


@pytest.mark.parametrize("host_dtype", [None, torch.float8_e4m3fn])
def test_arena_pins_exactly_its_bytes_and_releases_them_when_freed(cudart, host_dtype):
    before = pinning.pinned_bytes()
    arena = HostArena(_offload_engine(host_dtype), 2, 3, 2, 8, torch.bfloat16, capacity=1000)
    exact = allocation_bytes(2, 1000, 3, 2, 8, 2, host_dtype is not None)
    assert cudart.events == [("register", exact)]  # one region, not rounded up (a power of two would be 2**17)
    assert exact == (2 * 1000 * 3 * 2 * 2 * (8 + 4) if host_dtype else 2 * 1000 * 3 * 2 * 2 * 8 * 2)
    assert pinning.pinned_bytes() - before == exact
    view = arena.data[:, 5]  # a view keeps the pages (and the registration) alive
    arena.ensure_capacity(1500)  # growth: a new exact region; the old one goes when nothing uses it
    assert cudart.events[-1] == ("register", allocation_bytes(2, 2000, 3, 2, 8, 2, host_dtype is not None))
    assert ("unregister", exact) not in cudart.events
    del view
    gc.collect()
    assert cudart.events[-1] == ("unregister", exact)
    del arena
    gc.collect()
    assert pinning.pinned_bytes() == before and not cudart.registered


def test_pinned_pages_are_usable_and_zero_sized_tensors_skip_registration(cudart):
    tensor, status = pinning.allocate_pinned((3, 5), torch.float32)
    assert status == 0 and tensor.shape == (3, 5) and tensor.dtype == torch.float32
    tensor.copy_(torch.arange(15.0).view(3, 5))
    assert tensor.sum() == 105
    empty, status = pinning.allocate_pinned((0, 7), torch.float32)
    assert status == 0 and empty.shape == (0, 7) and cudart.events == [("register", 60)]


def test_a_host_tier_larger_than_memory_is_refused_before_anything_is_mapped(cudart, monkeypatch):
    monkeypatch.setattr(pinning, "pinnable_bytes", lambda: 10**6)
    mapped = []
    monkeypatch.setattr(pinning.mmap, "mmap", lambda *a, **k: mapped.append(a))
    with pytest.raises(okv.PromptError) as error:
        HostArena(_offload_engine(), 1, 24, 8, 128, torch.bfloat16, capacity=2048)
    message = str(error.value)
    assert "needs 0.20 GB of host memory but 0.00 GB are available" in message
    assert "offload.host_dtype = 'float8_e4m3fn'" in message and "omnikv plan" in message
    assert not mapped and not cudart.events
    # pageable host memory (no CUDA) has the same limit
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(okv.PromptError, match="host memory"):
        HostArena(TorchTransferEngine("cpu", "cpu", True), 1, 24, 8, 128, torch.bfloat16, capacity=2048)


@pytest.mark.parametrize(("batch", "chunk", "hot"), [(1, None, 0), (2, 16, 12)])
def test_planned_fp8_tiers_equal_what_the_cache_allocates(batch, chunk, hot):
    model = make_model("llama")
    config = okv.load_config(omni(6, prefill={"chunk_size": chunk}, offload={**FP8_OFFLOAD, "hot_cache_tokens": hot}))
    engine = okv.initialize(model, config)
    caches = capture_caches(engine)
    ids, mask = make_prompt(batch)
    engine.generate(ids, attention_mask=mask, max_new_tokens=7, pad_token_id=PAD)
    allocated = caches[-1].tier_bytes()
    plan = plan_memory(ModelGeometry.from_hf_config(model.config), config, ids.shape[1], batch, 7)
    assert {key: plan.tiers[key] for key in TIER_KEYS} == {key: allocated[key] for key in TIER_KEYS}
    # 3 sparse layers x 46 stored tokens x 2 KV heads x K,V x (16 one-byte codes + a float32 scale)
    assert plan.tiers["host"] == 3 * 46 * 2 * 2 * (16 + 4) * batch
    assert plan.host_dtype == "float8_e4m3fn" and plan.host_bytes_per_token == 3 * 2 * 2 * 20 * batch
    # the GPU tiers stay in the model's dtype (float32): staging of 6 selected rows
    assert plan.tiers["gpu_selected"] == 3 * 6 * 2 * 2 * 16 * 4 * batch
    # what is pinned: each arena's one allocation, codes then (aligned) scales
    storages = [arena.data.untyped_storage().nbytes() for arena in caches[-1].tiers.arenas if arena is not None]
    assert plan.tiers["host_reserved"] == sum(storages)


def test_llama3_8b_fp8_host_tier_holds_about_twice_the_tokens():
    config = okv.load_config("llama3_8b")
    geometry = ModelGeometry.from_hf_config(KNOWN_GEOMETRIES["llama3-8b"])
    fp8 = config.model_copy(deep=True)
    fp8.offload.host_dtype = "float8_e4m3fn"
    bf16_plan = plan_memory(geometry, config, 1 << 20, 1, 128, prefill=False)
    fp8_plan = plan_memory(geometry, fp8, 1 << 20, 1, 128, prefill=False)
    # 24 sparse layers x 8 KV heads x K,V: 128 bf16 values, or 128 codes + a float32 scale
    assert bf16_plan.host_bytes_per_token == 24 * 2 * 8 * 128 * 2 == 98_304
    assert fp8_plan.host_bytes_per_token == 24 * 2 * 8 * (128 + 4) == 50_688
    assert bf16_plan.tiers["host_reserved"] == bf16_plan.tiers["host_allocated"]  # exact: no power-of-two rounding
    assert fp8_plan.tiers["gpu_dense"] == bf16_plan.tiers["gpu_dense"]
    gpu, host = parse_bytes("139GiB"), parse_bytes("128GiB")
    bf16_long = longest_context(geometry, config, 1, 128, gpu, host, prefill=False)
    fp8_long = longest_context(geometry, fp8, 1, 128, gpu, host, prefill=False)
    assert bf16_long["limited_by"] == fp8_long["limited_by"] == "host"
    assert bf16_long["context"] >= 1_250_000 and fp8_long["context"] >= 2_000_000
    assert 1.9 < fp8_long["context"] / bf16_long["context"] < 1.95
    message = describe_shortfall(plan_memory(geometry, config, 2_000_000, 1, 128), config, gpu, host)
    assert "offload.host_dtype = 'float8_e4m3fn'" in message and "98,304 bytes per token" in message


def test_plan_cli_gives_the_longest_context_per_host_dtype(capsys, tmp_path):
    geometry = tmp_path / "config.json"  # Llama-3-8B without its trained position limit
    geometry.write_text(json.dumps({**KNOWN_GEOMETRIES["llama3-8b"], "max_position_embeddings": 1 << 24}))
    args = ["plan", "--config", "llama3_8b", "--model-config", str(geometry), "--context", "1048576"]
    args += ["--gpu-memory", "139GiB"]
    assert main([*args, "--host-memory", "120GiB", "--json"]) == 0
    by_dtype = json.loads(capsys.readouterr().out)["omnikv"]["longest_context_by_host_dtype"]
    assert set(by_dtype) == {"auto", "float8_e4m3fn"}
    assert by_dtype["auto"]["host_bytes_per_token"] == 98_304
    assert by_dtype["float8_e4m3fn"]["decode_only"]["context"] > 1.9 * by_dtype["auto"]["decode_only"]["context"]
    assert main([*args, "--host-memory", "120GiB", "--host-dtype", "float8_e4m3fn"]) == 0
    text = capsys.readouterr().out
    assert "host tier in float8_e4m3fn (50,688 bytes per token)" in text and "pinned, exact" in text


def test_profile_report_counts_fp8_host_bytes(tmp_path):
    engine = okv.initialize(make_model("llama"), omni(6, offload=FP8_OFFLOAD, profiling={"trace": False}))
    ids, mask = make_prompt(2)
    with okv.profile_memory(engine, out_dir=tmp_path, config={"interval_ms": 5, "png": False}):
        engine.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=PAD)
    (entry,) = json.loads((tmp_path / "report.json").read_text())["engines"]
    assert entry["host_dtype"] == "float8_e4m3fn"
    check = entry["geometry_check"]
    assert all(tier["match"] for tier in check.values())
    assert check["host"]["expected"] == 3 * 44 * 2 * 2 * (16 + 4) * 2 and check["host"]["scale_bytes"] == 4
    # each of the 4 decode steps fetched 6 rows of the 3 sparse layers in FP8 bytes
    assert entry["stats"]["transfer"]["bytes_fetched"] == 4 * 6 * 3 * 2 * 2 * (16 + 4) * 2


@pytest.mark.parametrize(
    ("fraction", "expected_gpu"),
    [
        (1.0, 30 + 4),  # the card's free memory plus what the allocator holds unused
        (0.3, 30 - 10 + 4),  # capped at 30% of the card: 30 GiB less the 10 reserved by this process
        (0.05, 0 + 4),  # a cap below what is reserved already: only the allocator's unused bytes
    ],
)
def test_available_memory_keeps_within_a_per_process_cap(monkeypatch, fraction, expected_gpu):
    from omnikv_runtime.planner import fit as planner_fit

    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (30 * gib, 100 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 10 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 6 * gib)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device: fraction)
    gpu, host = planner_fit.available_memory(torch.device("cuda", 0))
    assert gpu == expected_gpu * gib
    assert host > 0

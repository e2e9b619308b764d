"""How many requests of its context the server can hold: the memory planner's count (with explicit memory
figures), the same count as the check that refuses too many slots, the start's log line, ``--max-batch auto``
and its errors, and the help text."""

from __future__ import annotations

import argparse
import logging

import pytest
import torch
from okv_testlib import make_model, omni

import omnikv_runtime as okv
import omnikv_runtime.planner.fit as fit
import omnikv_runtime.serve.slot_checks as slot_checks
from omnikv_runtime.cli.serve import AUTO, batch_that_fits, max_batch_value
from omnikv_runtime.errors import ConfigError
from omnikv_runtime.planner import KNOWN_GEOMETRIES, ModelGeometry, parse_bytes, plan_memory
from omnikv_runtime.planner.fit import DEFAULT_HEADROOM, dense_twin, most_slots
from omnikv_runtime.serve import MAX_AUTO_BATCH

LLAMA3_8B = ModelGeometry.from_hf_config(KNOWN_GEOMETRIES["llama3-8b"])
CONTEXT, NEW = 32768, 256


def count_by_hand(geometry, config, context, new_tokens, gpu_free, host_free) -> int:
    """The reference: every batch from 1 up, planned (each request prefilled alone, as the server does), its
    weights taken off (resident), against the free memory."""
    rows = 0
    while True:
        plan = plan_memory(geometry, config, context - new_tokens, rows + 1, new_tokens, prefill_rows=1)
        if plan.gpu - plan.weights > int(gpu_free * (1 - DEFAULT_HEADROOM)) or plan.host > int(
            host_free * (1 - DEFAULT_HEADROOM)
        ):
            return rows
        rows += 1


@pytest.mark.parametrize("host_dtype", ["auto", "float8_e4m3fn"])
@pytest.mark.parametrize("gpu, host", [("60GB", "512GB"), ("60GB", "48GB"), ("20GB", "8GB")])
def test_count_equals_the_planners_batch_by_batch(host_dtype, gpu, host):
    config = okv.load_config("llama3_8b")
    config.offload.host_dtype = host_dtype
    gpu_free, host_free = parse_bytes(gpu), parse_bytes(host)
    found = most_slots(LLAMA3_8B, config, CONTEXT, NEW, gpu_free, host_free)
    assert found["slots"] == count_by_hand(LLAMA3_8B, config, CONTEXT, NEW, gpu_free, host_free)
    dense = most_slots(LLAMA3_8B, dense_twin(config), CONTEXT, NEW, gpu_free, host_free)
    assert dense["slots"] == count_by_hand(LLAMA3_8B, dense_twin(config), CONTEXT, NEW, gpu_free, host_free)
    assert dense["limited_by"] == "gpu"  # no host tier: a host that limits OmniKV may let a dense server hold more
    one_more = plan_memory(LLAMA3_8B, config, CONTEXT - NEW, found["slots"] + 1, NEW, prefill_rows=1)
    host_short = one_more.host > int(host_free * (1 - DEFAULT_HEADROOM))
    assert found["limited_by"] == ("host" if host_short else "gpu")


def test_fp8_host_tier_holds_more_requests_when_the_host_limits():
    config = okv.load_config("llama3_8b")
    fp8 = config.model_copy(deep=True)
    fp8.offload.host_dtype = "float8_e4m3fn"
    gpu_free, host_free = parse_bytes("60GB"), parse_bytes("12GB")
    model_dtype = most_slots(LLAMA3_8B, config, CONTEXT, NEW, gpu_free, host_free)
    quantized = most_slots(LLAMA3_8B, fp8, CONTEXT, NEW, gpu_free, host_free)
    assert model_dtype["limited_by"] == "host" and model_dtype["slots"] >= 1
    assert quantized["limited_by"] == "host" and quantized["slots"] >= 1.8 * model_dtype["slots"]


def test_count_stops_at_its_search_limit_and_at_zero():
    config = okv.load_config("llama3_8b")
    huge = most_slots(LLAMA3_8B, config, 1024, 16, parse_bytes("10TB"), parse_bytes("100TB"), limit=5)
    assert huge == {"slots": 5, "limited_by": "search limit"}
    none = most_slots(LLAMA3_8B, config, CONTEXT, NEW, parse_bytes("100MB"), parse_bytes("512GB"))
    assert none == {"slots": 0, "limited_by": "gpu"}
    with pytest.raises(ValueError, match="no room for a prompt"):
        most_slots(LLAMA3_8B, config, 256, 256, 1, 1)


@pytest.fixture
def engine():
    config = omni(0.25, offload={"device": "cpu"})
    config["model"] = {"max_context_len": 256}
    return okv.initialize(make_model(), config, tokenizer=object())


def as_if_on_cuda(monkeypatch, engine, gpu_free: int, host_free: int) -> None:
    """The engine's checks as on a CUDA card with these free memories (nothing is allocated: planner only)."""
    monkeypatch.setattr(engine, "device", torch.device("cuda"))
    monkeypatch.setattr(fit, "available_memory", lambda device: (gpu_free, host_free))


def test_the_count_is_what_the_refusal_allows(monkeypatch, engine, caplog):
    """On a (stand-in) card: n slots pass the check the scheduler runs, n + 1 are refused; the log line says n
    and the dense server's count, both the planner's."""
    context, new = slot_checks.slot_sizes(engine, None, 16)
    config = engine.planner_config()
    weights = plan_memory(engine.geometry, config, context - new, 1, new).weights
    gpu_free, host_free = weights + 2_000_000, 1_500_000
    as_if_on_cuda(monkeypatch, engine, gpu_free, host_free)
    capacity = slot_checks.slot_capacity(engine, context, new)
    expected = count_by_hand(engine.geometry, config, context, new, gpu_free, host_free)
    dense = count_by_hand(engine.geometry, dense_twin(config), context, new, gpu_free, host_free)
    assert capacity.slots == expected >= 2 and capacity.dense_slots == dense < expected
    with caplog.at_level(logging.INFO, logger=slot_checks.__name__):
        slot_checks.check_slots_fit(engine, expected, context, new)
    line = caplog.records[-1].getMessage()
    assert f"holds {expected} concurrent requests of {context} tokens" in line
    assert f"a dense server (every layer's KV on the GPU, no offload) would hold {dense}" in line
    assert "host tier in float32, the model's dtype" in line and f"serving {expected}" in line
    with pytest.raises(
        ConfigError, match=f"lower --max-batch or --max-context: {expected} fit, which --max-batch auto takes"
    ):
        slot_checks.check_slots_fit(engine, expected + 1, context, new)
    sized = slot_checks.slot_sizes(engine, None, None)  # as the server sizes its slots (new tokens by default)
    assert batch_that_fits(engine, None) == slot_checks.slot_capacity(engine, *sized).slots >= 1


def test_auto_with_no_room_says_what_to_change(monkeypatch, engine):
    as_if_on_cuda(monkeypatch, engine, 1000, 10**12)
    with pytest.raises(ConfigError) as caught:
        batch_that_fits(engine, 128)
    message = str(caught.value)
    assert "'max_batch' = 'auto'" in message and "not even one request of 128 tokens fits" in message
    assert "--max-context" in message and "offload.host_dtype = 'float8_e4m3fn'" in message
    assert "GPU needs" in message  # the planner's shortfall


def test_auto_is_capped(monkeypatch, engine):
    as_if_on_cuda(monkeypatch, engine, 10**13, 10**14)
    assert batch_that_fits(engine, 64) == MAX_AUTO_BATCH


def test_cpu_count_is_the_cpu_check(monkeypatch, engine, caplog):
    class Memory:
        available = 40_000_000

    monkeypatch.setattr(slot_checks.psutil, "virtual_memory", lambda: Memory)
    context, new = 256, 32
    per_slot = (context + 1 + new) * engine.geometry.num_layers * engine.geometry.kv_row_bytes(4)
    capacity = slot_checks.slot_capacity(engine, context, new)
    assert capacity.slots == int(0.9 * Memory.available) // per_slot and capacity.dense_slots is None
    with caplog.at_level(logging.INFO, logger=slot_checks.__name__):
        slot_checks.check_slots_fit(engine, capacity.slots, context, new)
    assert f"this machine holds {capacity.slots} concurrent requests of 256 tokens" in caplog.text
    with pytest.raises(ConfigError, match="GiB available"):
        slot_checks.check_slots_fit(engine, capacity.slots + 1, context, new)


@pytest.mark.parametrize("text, expected", [("auto", AUTO), ("AUTO", AUTO), ("3", 3)])
def test_max_batch_values(text, expected):
    assert max_batch_value(text) == expected


@pytest.mark.parametrize("text", ["0", "-2", "lots", "2.5", ""])
def test_bad_max_batch_values_name_what_is_allowed(text):
    with pytest.raises(argparse.ArgumentTypeError, match="at least 1, or 'auto'"):
        max_batch_value(text)


def test_serve_help_says_what_auto_counts(capsys):
    from omnikv_runtime.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--max-batch N|auto" in text and f"at most {MAX_AUTO_BATCH}" in text
    assert "how many requests of its context this machine holds" in text
    assert "how many a dense server (every layer's KV on the GPU, no offload) would hold on the same card" in text
    assert "'float8_e4m3fn'" in text


def test_omnikv_serve_auto_builds_the_scheduler_with_the_count(monkeypatch, engine):
    pytest.importorskip("fastapi")
    from serve_testlib import FakeScheduler

    import omnikv_runtime.cli.threads
    import omnikv_runtime.engine
    import omnikv_runtime.serve.scheduler
    from omnikv_runtime.cli import main
    from omnikv_runtime.serve.server import DrainingServer

    built = {}

    def scheduler(engine_arg, **kwargs):
        built.update(kwargs)
        return FakeScheduler()

    as_if_on_cuda(monkeypatch, engine, 10**13, 10**14)
    monkeypatch.setattr(omnikv_runtime.cli.threads, "apply_cpu_threads", lambda *a: None)
    monkeypatch.setattr(omnikv_runtime.engine, "initialize", lambda config: engine)
    monkeypatch.setattr(omnikv_runtime.serve.scheduler, "Scheduler", scheduler)
    monkeypatch.setattr(DrainingServer, "run", lambda server: None)
    assert main(["serve", "--config", "configs/default.json", "--max-batch", "auto", "--max-context", "64"]) == 0
    assert built["max_batch"] == MAX_AUTO_BATCH and built["max_context"] == 64


def test_omnikv_serve_says_the_capacity_at_start_without_verbose(monkeypatch, engine, caplog):
    """The real scheduler under the command, no -v: the capacity line is logged (the command lets the serve
    package's INFO lines through from before the scheduler is built), with auto's count."""
    pytest.importorskip("fastapi")
    import types

    import omnikv_runtime.cli.threads
    import omnikv_runtime.engine
    from omnikv_runtime.cli import main
    from omnikv_runtime.serve.server import DrainingServer

    engine.tokenizer = types.SimpleNamespace(eos_token_id=None, pad_token_id=0)
    as_if_on_cuda(monkeypatch, engine, 10**13, 10**14)
    monkeypatch.setattr(engine, "device", torch.device("cpu"))  # the slots are allocated for real, on the CPU

    class Memory:
        available = 10**12

    monkeypatch.setattr(slot_checks.psutil, "virtual_memory", lambda: Memory)
    monkeypatch.setattr(omnikv_runtime.cli.threads, "apply_cpu_threads", lambda *a: None)
    monkeypatch.setattr(omnikv_runtime.engine, "initialize", lambda config: engine)
    monkeypatch.setattr(DrainingServer, "run", lambda server: None)
    assert main(["serve", "--config", "configs/default.json", "--max-batch", "auto", "--max-context", "32"]) == 0
    assert logging.getLogger().level == logging.WARNING  # nobody else lets INFO through
    (line,) = [r.getMessage() for r in caplog.records if r.name == slot_checks.__name__]
    assert "this machine holds" in line and "concurrent requests of 32 tokens" in line
    assert line.endswith(f"serving {MAX_AUTO_BATCH}")


def test_the_server_plans_each_prefill_alone_and_holds_more_long_requests_than_a_dense_server():
    """The server prefills one request at a time (its chunks packed with others' at most a chunk's tokens a turn),
    so its slots are planned with one row's prefill, not a padded batch's mask over every slot's context: at
    128K tokens on an 80 GB card the host tier holds at least 2.5 times the requests a dense server holds."""
    config = okv.load_config("llama3_8b")
    gpu_free, host_free = parse_bytes("64GB"), parse_bytes("512GB")
    served = most_slots(LLAMA3_8B, config, 131072, NEW, gpu_free, host_free)
    dense = most_slots(LLAMA3_8B, dense_twin(config), 131072, NEW, gpu_free, host_free)
    assert dense["slots"] >= 1 and served["slots"] >= 2.5 * dense["slots"]
    batched = plan_memory(LLAMA3_8B, config, 131072 - NEW, served["slots"], NEW)  # a padded batch's prefill
    alone = plan_memory(LLAMA3_8B, config, 131072 - NEW, served["slots"], NEW, prefill_rows=1)
    assert alone.activations["prefill"] < batched.activations["prefill"]
    assert alone.activations["decode"] == batched.activations["decode"] and alone.tiers == batched.tiers


def test_a_packed_turn_budget_is_planned_as_one_forward_of_the_whole_budget():
    """A turn packs several requests' chunks into one forward of up to ``max_prefill_tokens``: its hidden states
    and MLP activations grow with the budget, so the plan does too (one chunk's budget plans as before; a budget
    under one chunk cuts the chunk), and on a card near its limit a larger budget leaves fewer slots."""
    config = okv.load_config("llama3_8b")
    chunk = config.prefill.chunk_size
    context = CONTEXT - NEW

    def prefill_bytes(tokens):
        return plan_memory(LLAMA3_8B, config, context, 4, NEW, prefill_rows=1, prefill_tokens=tokens).activations

    default = plan_memory(LLAMA3_8B, config, context, 4, NEW, prefill_rows=1).activations
    assert prefill_bytes(chunk) == default
    packed = prefill_bytes(4 * chunk)
    mlp = 3 * 4 * chunk * LLAMA3_8B.intermediate * 2  # gate, up and their product for every packed token, bf16
    assert packed["prefill"] >= mlp > default["prefill"] and packed["decode"] == default["decode"]
    assert prefill_bytes(chunk // 4)["prefill"] < default["prefill"]
    host = parse_bytes("512GB")
    weights = plan_memory(LLAMA3_8B, config, context, 1, NEW).weights
    tight = weights + plan_memory(LLAMA3_8B, config, context, 6, NEW, prefill_rows=1).gpu - weights
    tight = int(tight / (1 - DEFAULT_HEADROOM)) - weights
    one_chunk = most_slots(LLAMA3_8B, config, CONTEXT, NEW, tight, host)
    eight_chunks = most_slots(LLAMA3_8B, config, CONTEXT, NEW, tight, host, prefill_tokens=8 * chunk)
    assert one_chunk["slots"] >= 6 > eight_chunks["slots"] >= 1


def test_the_scheduler_checks_its_slots_with_its_turn_budget(monkeypatch, engine):
    """The start check plans the turn budget the scheduler will run (not one chunk): with a budget too large for
    the (stand-in) card, the scheduler refuses to start, saying what to lower; one chunk's budget fits."""
    from omnikv_runtime.serve.scheduler import Scheduler

    context, new = slot_checks.slot_sizes(engine, None, None)
    config = engine.planner_config()
    plan = plan_memory(engine.geometry, config, context - new, 2, new, prefill_rows=1)
    gpu_free = int((plan.gpu - plan.weights) / (1 - DEFAULT_HEADROOM)) + 1
    as_if_on_cuda(monkeypatch, engine, gpu_free, 10**12)
    with pytest.raises(ConfigError, match="lower --max-batch or --max-context"):
        Scheduler(engine, max_batch=2, max_prefill_tokens=64 * context)
    slot_checks.check_slots_fit(engine, 2, context, new)  # one chunk a forward: the same slots fit

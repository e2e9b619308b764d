"""The host tier (HostArena) and the portable transfer engine, on random data with poisoned outputs."""

from __future__ import annotations

import logging

import pytest
import torch

from omnikv_runtime.transfer import HostArena, TorchTransferEngine, make_transfer_engine, pinning

CPU = torch.device("cpu")
BATCH, LAYERS, HEADS, DIM = 2, 3, 2, 8


def cpu_engine() -> TorchTransferEngine:
    return TorchTransferEngine(CPU, CPU, pin_memory=False)


def random_kv(tokens: int, seed: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(BATCH, HEADS, tokens, DIM, generator=g).to(dtype)
    values = torch.randn(BATCH, HEADS, tokens, DIM, generator=g).to(dtype)
    return keys, values


def poisoned_arena(engine, capacity: int, dtype=torch.float32) -> HostArena:
    arena = HostArena(engine, BATCH, LAYERS, HEADS, DIM, dtype, capacity)
    arena.data.fill_(float("nan"))
    return arena


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_fetches_exactly_the_source_rows(dtype):
    engine = cpu_engine()
    arena = HostArena(engine, BATCH, LAYERS, HEADS, DIM, dtype, capacity=30)
    g = torch.Generator().manual_seed(0)
    arena.data.copy_(torch.randn(arena.data.shape, generator=g).to(dtype))
    arena.lengths = [30] * LAYERS
    k = 6
    indices = torch.stack([torch.randperm(30, generator=g)[:k].sort().values for _ in range(BATCH)])
    assert not torch.equal(indices[0], indices[1])
    # the packed staging buffer [batch, k, layers, 2, heads, dim] is a view into a larger one (strided batch rows),
    # keys poisoned with NaN, values with 1e30
    buffer = torch.empty((BATCH, 16, LAYERS, 2, HEADS, DIM), dtype=dtype)
    buffer[:, :, :, 0] = float("nan")
    buffer[:, :, :, 1] = 1e30
    staging = buffer[:, :k]
    assert not staging.is_contiguous()
    arena.gather(indices, staging)

    for slot in range(LAYERS):
        for b in range(BATCH):
            for j in range(k):
                row = arena.data[b, indices[b, j], slot]  # [2, heads, dim]
                assert torch.equal(staging[b, j, slot, 0], row[0])
                assert torch.equal(staging[b, j, slot, 1], row[1])
    assert torch.isnan(buffer[:, k:, :, 0]).all()  # nothing written past the k requested rows
    assert (buffer[:, k:, :, 1] == 1e30).all()
    assert engine.stats.gathers == 1
    assert engine.stats.bytes_fetched == BATCH * k * LAYERS * 2 * HEADS * DIM * arena.data.element_size()


@pytest.mark.parametrize("host_dtype", [None, torch.float8_e4m3fn])
def test_padding_lanes_fetch_nothing_and_count_no_bytes(host_dtype):
    """-1 lanes (an idle slot's row, the end of a shorter selection) leave their staging rows as they were,
    and the byte counter counts the real lanes only."""
    engine = TorchTransferEngine(CPU, CPU, pin_memory=False, fetches_rows=True, host_dtype=host_dtype)
    arena = HostArena(engine, BATCH, LAYERS, HEADS, DIM, torch.float32, capacity=20)
    for slot in range(LAYERS):
        arena.append(slot, *random_kv(20, seed=3 + slot))
    full = torch.full((BATCH, 4, LAYERS, 2, HEADS, DIM), float("nan"))
    arena.gather(torch.tensor([[2, 9, 17, 0], [5, 6, 7, 8]]), full)
    lanes = torch.tensor([[2, -1, 17, -1], [-1, -1, -1, -1]])
    engine.stats.bytes_fetched = 0
    staging = torch.full_like(full, float("nan"))
    arena.gather(lanes, staging, real_rows=2)
    assert torch.equal(staging[0, [0, 2]], full[0, [0, 2]])
    assert torch.isnan(staging[0, [1, 3]]).all() and torch.isnan(staging[1]).all()
    per_row_values = LAYERS * 2 * HEADS * DIM
    per_row_bytes = per_row_values * 4 if host_dtype is None else per_row_values + per_row_values // DIM * 4
    assert engine.stats.bytes_fetched == 2 * per_row_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_row_copies_one_ring_slot_to_one_arena_column(dtype):
    """Decode write-back: ``arena[:, position] = ring[:, slot]`` (packed rows), indices as int64 [1] tensors."""
    engine = cpu_engine()
    arena = poisoned_arena(engine, capacity=12, dtype=dtype)
    ring = torch.randn((BATCH, 5, LAYERS, 2, HEADS, DIM), generator=torch.Generator().manual_seed(4)).to(dtype)
    engine.write_row(arena.data, torch.tensor([7]), ring, torch.tensor([3]))
    assert torch.equal(arena.data[:, 7], ring[:, 3])
    assert torch.isnan(arena.data[:, :7]).all() and torch.isnan(arena.data[:, 8:]).all()
    engine.write_row(arena.data, torch.tensor([0]), ring, torch.tensor([4]))
    assert torch.equal(arena.data[:, 0], ring[:, 4]) and torch.equal(arena.data[:, 7], ring[:, 3])
    assert torch.isnan(arena.data[:, 1:7]).all() and torch.isnan(arena.data[:, 8:]).all()
    assert engine.stats.bytes_written == 2 * BATCH * LAYERS * 2 * HEADS * DIM * arena.data.element_size()


def test_write_rows_then_read_rows_round_trip():
    engine = cpu_engine()
    data = engine.allocate_host((BATCH, 20, LAYERS, 2, HEADS, DIM), torch.float32)
    data.fill_(float("nan"))
    first, second = random_kv(5, 1), random_kv(4, 2)
    engine.write_rows(data, 1, 0, *first)
    engine.write_rows(data, 1, 5, *second)
    keys, values = engine.read_rows(data, 1, 9)
    assert keys.shape == (BATCH, HEADS, 9, DIM)
    assert torch.equal(keys, torch.cat([first[0], second[0]], dim=2))
    assert torch.equal(values, torch.cat([first[1], second[1]], dim=2))
    assert torch.isnan(data[:, :, [0, 2]]).all()  # other layers' slots untouched
    assert torch.isnan(data[:, 9:, 1]).all()  # nothing past the written tokens
    assert engine.stats.bytes_written == 2 * (5 + 4) * BATCH * HEADS * DIM * 4


def test_arena_growth_keeps_old_rows():
    engine = cpu_engine()
    arena = poisoned_arena(engine, capacity=4)
    written: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {slot: [] for slot in range(LAYERS)}
    plan = [(0, 3), (1, 3), (2, 1), (0, 5), (1, 2), (2, 9), (1, 14), (0, 1)]  # (slot, tokens): grows 4 -> 8 -> 16 ...
    capacities = []
    for step, (slot, tokens) in enumerate(plan):
        kv = random_kv(tokens, 10 + step)
        length = arena.append(slot, *kv)
        written[slot].append(kv)
        assert length == sum(k.shape[2] for k, _ in written[slot]) == arena.lengths[slot]
        capacities.append(arena.capacity)
        for s in range(LAYERS):  # every layer's rows so far are intact after each growth
            if written[s]:
                keys, values = arena.read(s, arena.lengths[s])
                assert torch.equal(keys, torch.cat([k for k, _ in written[s]], dim=2))
                assert torch.equal(values, torch.cat([v for _, v in written[s]], dim=2))
    assert capacities[0] == 4 and capacities[-1] >= max(arena.lengths) and len(set(capacities)) >= 3
    assert arena.used_bytes() == BATCH * sum(arena.lengths) * arena.row_bytes
    assert arena.nbytes() == arena.data.numel() * 4


def test_select_batch_reorders_rows():
    engine = cpu_engine()
    arena = poisoned_arena(engine, capacity=8)
    kv = random_kv(5, 3)
    for slot in range(LAYERS):
        arena.append(slot, *kv)
    arena.select_batch(torch.tensor([1, 0]))
    keys, values = arena.read(2, 5)
    assert torch.equal(keys, kv[0][[1, 0]]) and torch.equal(values, kv[1][[1, 0]])


def test_make_transfer_engine_places_the_host_tier():
    offload = make_transfer_engine(CPU, "cpu", True)
    assert offload.host_device == CPU and not offload.offloaded
    resident = make_transfer_engine(CPU, "none", True)
    assert resident.host_device == resident.compute_device == CPU


def test_pinned_allocation_failure_falls_back_to_pageable_memory(monkeypatch, caplog):
    attempts = []

    def register(pointer: int, size: int) -> int:
        attempts.append(size)
        return 2  # cudaErrorMemoryAllocation

    def unregister(pointer: int) -> int:
        raise AssertionError("a registration that failed must not be undone")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pinning, "_cudart_register", lambda: (register, unregister))
    # a compute device other than the host's makes the engine offload (and want pinned memory)
    engine = TorchTransferEngine(torch.device("meta"), CPU, pin_memory=True)
    assert engine.offloaded
    caplog.set_level(logging.WARNING)
    host = engine.allocate_host((BATCH, 10, LAYERS, 2, HEADS, DIM), torch.float16)

    assert attempts == [BATCH * 10 * LAYERS * 2 * HEADS * DIM * 2]  # exactly the tensor's bytes, once
    assert host.shape == (BATCH, 10, LAYERS, 2, HEADS, DIM) and host.dtype == torch.float16
    assert host.device == CPU
    host.fill_(1.5)  # ordinary pageable memory, usable
    assert float(host.float().sum()) == 1.5 * host.numel()
    assert engine.stats.pinned_fallbacks == 1 and pinning.pinned_bytes() == 0
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "pinning" in warnings[0].getMessage() and "pageable" in warnings[0].getMessage()
    engine.allocate_host((1, 4), torch.float32)
    assert engine.stats.pinned_fallbacks == 2 and len(caplog.records) == 1  # warned once
    engine.reset_stats()
    assert engine.stats.pinned_fallbacks == 2  # kept across per-generate resets
    assert engine.stats.as_dict()["pinned_fallbacks"] == 2


def test_no_pinning_attempt_when_not_offloaded_or_not_asked(monkeypatch):
    def refuse():
        raise AssertionError("unexpected pinning")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(pinning, "_cudart_register", refuse)
    for engine in (TorchTransferEngine(CPU, CPU, True), TorchTransferEngine(torch.device("meta"), CPU, False)):
        host = engine.allocate_host((1, 2, 1, 2, 1, 4), torch.float32)
        assert host.device == CPU and engine.stats.pinned_fallbacks == 0

"""The FP8 host tier on CPU: the quantizer against a plain reference, the torch transfer path with
poisoned outputs, and whole runs that quantize keys (after RoPE) and values at write-back."""

from __future__ import annotations

import math

import pytest
import torch
from okv_testlib import (
    NUM_LAYERS,
    PAD,
    SPARSE_LAYERS,
    cache_keyword,
    capture_caches,
    make_model,
    make_prompt,
    omni,
)

import omnikv_runtime as okv
from omnikv_runtime.layout import Role
from omnikv_runtime.policies import LRUEviction
from omnikv_runtime.transfer import HostArena, HotCache, TorchTransferEngine, fp8, make_transfer_engine

CPU = torch.device("cpu")
FP8 = torch.float8_e4m3fn
BATCH, LAYERS, HEADS, DIM = 2, 3, 2, 8
POISON = 0x7F  # a NaN code: never written by the quantizer


def reference_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group by group in Python: the smallest power of two 2**k (k in -126..126) with max|x| / 2**k <= 448,
    then x / 2**k rounded to e4m3 (torch's cast rounds to nearest even)."""
    groups = x.float().reshape(-1, x.shape[-1])
    codes, scales = [], []
    for group in groups:
        amax = float(group.abs().max())
        k = -126
        if amax > 0:
            k = math.ceil(math.log2(amax / 448))
            while amax / 2.0**k > 448:  # guard the logarithm's rounding
                k += 1
            while amax / 2.0 ** (k - 1) <= 448:
                k -= 1
            k = max(-126, min(126, k))
        codes.append((group / 2.0**k).clamp(-448, 448).to(FP8))
        scales.append(2.0**k)
    shape = x.shape
    return torch.stack(codes).reshape(shape), torch.tensor(scales, dtype=torch.float32).reshape(shape[:-1])


def bytes_of(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.uint8)


def test_quantizer_equals_the_reference_and_keeps_its_error_bound():
    g = torch.Generator().manual_seed(0)
    spread = torch.logspace(-12, 12, 64)[:, None, None]  # groups of very different magnitudes
    x = torch.randn(64, 5, 16, generator=g) * spread
    x[3, 1] = 0.0  # an all-zero group
    x[4, 2, :] = 448.0  # exactly representable at scale 1
    x[5, 0, 3] = 1e-30  # a tiny value beside large ones: rounds to zero
    codes, scales = fp8.quantize(x)
    ref_codes, ref_scales = reference_quantize(x)
    assert codes.dtype == FP8 and scales.dtype == torch.float32
    assert torch.equal(bytes_of(codes), bytes_of(ref_codes))
    assert torch.equal(scales, ref_scales)
    assert scales[3, 1] == 2.0**-126 and scales[4, 2] == 1.0
    assert (x.abs().amax(-1) / scales <= 448).all() and (x.abs().amax(-1) / scales > 224).sum() == 64 * 5 - 1
    back = fp8.dequantize(codes, scales, torch.float32)
    bound = torch.maximum(x.abs() * 2.0**-4, scales.unsqueeze(-1) * 2.0**-10)
    assert ((back - x).abs() <= bound).all()
    for dtype in (torch.bfloat16, torch.float16):  # dequantized values convert exactly (4 significant bits)
        moderate = x[20:44]
        c, s = fp8.quantize(moderate.to(dtype))
        assert torch.equal(fp8.dequantize(c, s, dtype).float(), fp8.dequantize(c, s, torch.float32))


def test_rounding_is_to_nearest_even_with_saturation():
    # at scale 1 (max 448): 17 lies halfway between 16 and 18 (step 2) -> 16 (even mantissa); 19 -> 20;
    # subnormals step by 2**-9: 3 steps stay, half a step and 1.5 steps go to the even neighbour
    x = torch.tensor([[448.0, 17.0, 19.0, -17.0, 3 * 2.0**-9, 2.0**-10, 3 * 2.0**-10, 5 * 2.0**-11]])
    codes, scales = fp8.quantize(x)
    assert scales.item() == 1.0
    assert codes.float().tolist() == [[448.0, 16.0, 20.0, -16.0, 3 * 2.0**-9, 0.0, 2.0**-8, 2.0**-9]]


def _engine() -> TorchTransferEngine:
    return TorchTransferEngine(CPU, CPU, pin_memory=False, fetches_rows=True, host_dtype=FP8)


def _poisoned_arena(capacity: int, dtype=torch.bfloat16) -> HostArena:
    arena = HostArena(_engine(), BATCH, LAYERS, HEADS, DIM, dtype, capacity)
    bytes_of(arena.data).fill_(POISON)
    arena.scales.fill_(float("nan"))
    return arena


def _kv(tokens: int, seed: int, dtype=torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(BATCH, HEADS, tokens, DIM, generator=g) * 40
    return keys.to(dtype), (torch.randn(BATCH, HEADS, tokens, DIM, generator=g) / 9).to(dtype)


def test_arena_layout_and_bytes():
    arena = _poisoned_arena(10)
    assert arena.data.dtype == FP8 and arena.dtype == torch.bfloat16 and arena.quantized
    assert arena.scales.shape == (BATCH, 10, LAYERS, 2, HEADS)
    # codes and scales are views of one allocation (one pinned region on a GPU machine)
    assert arena.data.untyped_storage().data_ptr() == arena.scales.untyped_storage().data_ptr()
    assert arena.row_bytes == 2 * HEADS * DIM + 2 * HEADS * 4
    assert arena.fetch_row_bytes == LAYERS * arena.row_bytes
    assert arena.nbytes() == BATCH * 10 * LAYERS * arena.row_bytes
    plain = HostArena(TorchTransferEngine(CPU, CPU, False), BATCH, LAYERS, HEADS, DIM, torch.bfloat16, 10)
    assert plain.scales is None and plain.row_bytes == 2 * HEADS * DIM * 2


def test_write_read_quantize_and_dequantize_one_layer_slot():
    arena = _poisoned_arena(12)
    keys, values = _kv(5, seed=1)
    arena.lengths = [4] * LAYERS
    assert arena.append(1, keys, values) == 9
    for part, kv in enumerate((keys, values)):
        codes, scales = reference_quantize(kv.transpose(1, 2))
        assert torch.equal(bytes_of(arena.data[:, 4:9, 1, part]), bytes_of(codes))
        assert torch.equal(arena.scales[:, 4:9, 1, part], scales)
    untouched = torch.ones(12, dtype=torch.bool)
    untouched[4:9] = False
    assert (bytes_of(arena.data[:, untouched]) == POISON).all() and (bytes_of(arena.data[:, :, [0, 2]]) == POISON).all()
    assert torch.isnan(arena.scales[:, untouched]).all() and torch.isnan(arena.scales[:, :, [0, 2]]).all()
    assert arena.engine.stats.bytes_written == 2 * BATCH * 5 * HEADS * (DIM + 4)

    read_keys, read_values = arena.read(1, 9, start=4)
    assert read_keys.dtype == torch.bfloat16 and read_keys.shape == keys.shape
    for got, kv in ((read_keys, keys), (read_values, values)):
        codes, scales = reference_quantize(kv)
        assert torch.equal(got, fp8.dequantize(codes, scales, torch.bfloat16))
    torch.testing.assert_close(read_keys.float(), keys.float(), rtol=2**-4, atol=0)


def test_gather_dequantizes_selected_rows_into_poisoned_staging():
    arena = _poisoned_arena(30)
    for slot in range(LAYERS):
        arena.append(slot, *_kv(30, seed=10 + slot))
    g = torch.Generator().manual_seed(3)
    k = 6
    indices = torch.stack([torch.randperm(30, generator=g)[:k] for _ in range(BATCH)])
    buffer = torch.full((BATCH, 9, LAYERS, 2, HEADS, DIM), float("nan"), dtype=torch.bfloat16)
    staging = buffer[:, :k]
    arena.engine.reset_stats()
    arena.gather(indices, staging)
    expected = fp8.dequantize(arena.data, arena.scales, torch.bfloat16)[torch.arange(BATCH)[:, None], indices]
    assert torch.equal(staging, expected)
    assert torch.isnan(buffer[:, k:]).all()
    # the bytes a fetch moves are the tier's: one byte per value plus a float32 scale per head_dim values
    assert arena.engine.stats.bytes_fetched == BATCH * k * LAYERS * 2 * HEADS * (DIM + 4)

    hot = HotCache(LRUEviction(), BATCH, 4, arena.row_shape, arena.dtype, CPU, 30, arena.fetch_row_bytes)
    through = torch.full_like(staging, float("nan"))
    arena.gather(indices, through, hot)
    assert torch.equal(through, expected)
    arena.gather(indices, through, hot)  # hits now come from the hot rows, kept in the model's dtype
    assert torch.equal(through, expected)
    assert hot.data.dtype == torch.bfloat16
    counters = hot.counters()
    assert counters["hot_bytes_fetched"] == counters["hot_misses"] * LAYERS * 2 * HEADS * (DIM + 4)


def test_decode_write_back_quantizes_one_ring_row():
    arena = _poisoned_arena(12, dtype=torch.float32)
    ring = torch.randn(BATCH, 5, LAYERS, 2, HEADS, DIM, generator=torch.Generator().manual_seed(4)) * 3
    arena.write_row(torch.tensor([7]), ring, torch.tensor([3]))
    codes, scales = reference_quantize(ring[:, 3])
    assert torch.equal(bytes_of(arena.data[:, 7]), bytes_of(codes)) and torch.equal(arena.scales[:, 7], scales)
    others = [t for t in range(12) if t != 7]
    assert (bytes_of(arena.data[:, others]) == POISON).all() and torch.isnan(arena.scales[:, others]).all()
    assert arena.engine.stats.bytes_written == BATCH * LAYERS * 2 * HEADS * (DIM + 4)


def test_growth_and_batch_selection_keep_codes_and_scales():
    arena = _poisoned_arena(4)
    keys, values = _kv(4, seed=5)
    for slot in range(LAYERS):
        arena.append(slot, keys, values)
    before_codes, before_scales = arena.data.clone(), arena.scales.clone()
    arena.append(0, *_kv(3, seed=6))  # past the capacity: the arena grows (at least doubling)
    assert arena.capacity == 8
    assert torch.equal(bytes_of(arena.data[:, :4]), bytes_of(before_codes))
    assert torch.equal(arena.scales[:, :4], before_scales)
    assert arena.data.untyped_storage().data_ptr() == arena.scales.untyped_storage().data_ptr()
    arena.select_batch(torch.tensor([1, 1, 0]))
    assert arena.data.shape[0] == 3
    assert torch.equal(bytes_of(arena.data[:, :4]), bytes_of(before_codes[[1, 1, 0]]))
    assert torch.equal(arena.scales[:, :4], before_scales[[1, 1, 0]])


def test_fp8_host_tier_needs_offload_to_host_memory():
    # the config's rule, checked at load
    with pytest.raises(okv.ConfigError, match=r"offload\.host_dtype.*float8_e4m3fn.*offload\.device = 'none'"):
        okv.load_config({"offload": {"device": "none", "host_dtype": "float8_e4m3fn"}})
    with pytest.raises(okv.ConfigError, match=r"offload\.host_dtype"):
        okv.load_config({"offload": {"host_dtype": "float8"}})
    # raw arguments, past the config: the transfer engine refuses an FP8 tier attention would read in place
    with pytest.raises(ValueError, match=r"float8_e4m3fn host tier needs an engine that fetches rows"):
        make_transfer_engine(CPU, "none", False, host_dtype="float8_e4m3fn")
    with pytest.raises(ValueError, match=r"'float8'.*'auto', 'float8_e4m3fn'"):
        make_transfer_engine(CPU, "cpu", False, host_dtype="float8")
    engine = make_transfer_engine(CPU, "cpu", False, host_dtype="float8_e4m3fn")
    assert engine.host_dtype == FP8 and engine.fetches_rows


def _sparse_slot(engine, layer: int) -> tuple[int, int]:
    segment = engine.plan.segment_of[layer]
    return segment, engine.plan.segments[segment].sparse_layers.index(layer)


def _greedy_with_fake_quantized_prompt(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Dense greedy decoding where the sparse layers' prompt KV is replaced by its FP8 round trip: what a
    100% budget over an FP8 host tier computes (generated tokens stay exact in the tail ring)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    keyword = {cache_keyword(model): cache}
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=True, **keyword).logits
        for layer in SPARSE_LAYERS:
            for name in ("keys", "values"):
                stored = getattr(cache.layers[layer], name)
                stored.copy_(fp8.dequantize(*fp8.quantize(stored), stored.dtype))
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(steps - 1):
            logits = model(input_ids=tokens[-1], use_cache=True, **keyword).logits
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat([ids, *tokens], dim=1)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_full_budget_over_fp8_tier_equals_dense_with_fake_quantized_prompt(family):
    steps = 16
    ids, _ = make_prompt(1, length=40)
    model = make_model(family)
    engine = okv.initialize(model, omni(1.0, offload={"host_dtype": "float8_e4m3fn"}, prefill={"chunk_size": None}))
    caches = capture_caches(engine)
    out = engine.generate(ids, max_new_tokens=steps, pad_token_id=PAD)
    assert torch.equal(out, _greedy_with_fake_quantized_prompt(make_model(family), ids, steps))

    cache = caches[0]
    dense = okv.initialize(make_model(family), {"omnikv": {"enabled": False}})
    dense_caches = capture_caches(dense)
    dense.generate(ids, max_new_tokens=1, pad_token_id=PAD)
    for layer in range(NUM_LAYERS):
        if engine.plan.role(layer) is not Role.SPARSE:
            continue
        segment, slot = _sparse_slot(engine, layer)
        arena = cache.tiers.arenas[segment]
        assert arena.data.dtype == FP8 and arena.lengths[slot] == 40 + steps - 1
        # the prompt: the dense run's keys (after RoPE) and values, quantized, bit for bit
        for part, name in enumerate(("keys", "values")):
            codes, scales = reference_quantize(getattr(dense_caches[0].layers[layer], name).transpose(1, 2))
            assert torch.equal(bytes_of(arena.data[:, :40, slot, part]), bytes_of(codes)), (layer, name)
            assert torch.equal(arena.scales[:, :40, slot, part], scales)
        # generated tokens: each step's write-back quantized the tail ring's exact row
        ring = cache.tiers.segments[segment].ring[:, : steps - 1, slot]
        codes, scales = reference_quantize(ring)
        assert torch.equal(bytes_of(arena.data[:, 40 : 40 + steps - 1, slot]), bytes_of(codes))
        assert torch.equal(arena.scales[:, 40 : 40 + steps - 1, slot], scales)
    stats = engine.stats()["transfer"]
    dim = model.config.head_dim or model.config.hidden_size // model.config.num_attention_heads
    # each of the steps - 1 decode steps fetches 40 rows (budget 1.0 of the prompt) of every sparse layer:
    # K and V of 2 KV heads, one byte per value and a float32 scale each
    assert stats["bytes_fetched"] == (steps - 1) * 40 * len(SPARSE_LAYERS) * 2 * 2 * (dim + 4)


def test_chunked_prefill_reads_the_fp8_tier_back_dequantized(monkeypatch):
    reads = []
    read_rows = TorchTransferEngine.read_rows

    def spy(self, arena, slot, stop, start=0, scales=None, dtype=None):
        keys, values = read_rows(self, arena, slot, stop, start, scales, dtype)
        stored = fp8.dequantize(arena[:, start:stop, slot], scales[:, start:stop, slot], dtype)
        reads.append(
            torch.equal(keys, stored[:, :, 0].transpose(1, 2)) and torch.equal(values, stored[:, :, 1].transpose(1, 2))
        )
        return keys, values

    monkeypatch.setattr(TorchTransferEngine, "read_rows", spy)
    ids, mask = make_prompt(2, length=43)
    outputs = []
    for chunk in (None, 7):
        engine = okv.initialize(
            make_model("llama"), omni(8, offload={"host_dtype": "float8_e4m3fn"}, prefill={"chunk_size": chunk})
        )
        outputs.append(engine.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=PAD))
    # 6 later chunks read each sparse layer's earlier tokens back, in the model's dtype
    assert len(reads) == 6 * len(SPARSE_LAYERS) and all(reads)
    assert torch.equal(outputs[0], outputs[1])  # rounding-level differences: the same tokens here

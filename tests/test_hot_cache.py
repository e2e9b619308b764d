"""The GPU hot cache (delta fetch) and its eviction policies, on CPU through the torch engine.

Every step's gathered rows must equal the host arena's rows exactly (outputs poisoned first);
hits must be exactly the selected tokens the cache held; what each policy evicts must be what
it promises (LRU: least recently used; LFU: least used; none: nothing).
"""

from __future__ import annotations

import pytest
import torch
from okv_testlib import dense_reference, make_model, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime.policies import LFUEviction, LRUEviction, NoEviction, make_eviction_policy
from omnikv_runtime.transfer import HostArena, HotCache, TorchTransferEngine

CPU = torch.device("cpu")
BATCH, LAYERS, HEADS, DIM, TOKENS = 2, 3, 2, 4, 40


def _arena(seed: int = 0) -> HostArena:
    engine = TorchTransferEngine(CPU, CPU, pin_memory=False)
    arena = HostArena(engine, BATCH, LAYERS, HEADS, DIM, torch.float32, TOKENS)
    arena.data.copy_(torch.randn(arena.data.shape, generator=torch.Generator().manual_seed(seed)))
    arena.lengths = [TOKENS] * LAYERS
    return arena


def _selections(steps: int, k: int, seed: int = 1) -> list[torch.Tensor]:
    """Overlapping selections: each step keeps most of the last one and swaps a few tokens."""
    g = torch.Generator().manual_seed(seed)
    current = [torch.randperm(TOKENS, generator=g)[:k] for _ in range(BATCH)]
    out = []
    for _ in range(steps):
        for b in range(BATCH):
            outside = torch.tensor([t for t in range(TOKENS) if t not in set(current[b].tolist())])
            swap = torch.randperm(k, generator=g)[: k // 3]
            current[b][swap] = outside[torch.randperm(len(outside), generator=g)[: len(swap)]]
        out.append(torch.stack([c.sort().values for c in current]))
    return out


def _cached(hot: HotCache, b: int) -> set[int]:
    tokens = hot.token_of_slot[b, : hot.slots]
    return set(tokens[tokens >= 0].tolist())


def _check_consistent(hot: HotCache) -> None:
    for b in range(BATCH):
        for slot in range(hot.slots):
            token = int(hot.token_of_slot[b, slot])
            if token >= 0:
                assert int(hot.slot_of_token[b, token]) == slot
                assert torch.equal(hot.data[b, slot], _ARENA.data[b, token])  # the slot holds that token's row
        mapped = (hot.slot_of_token[b, :TOKENS] >= 0).sum()
        assert int(mapped) == len(_cached(hot, b))


_ARENA = _arena()


def _run(policy, slots: int, k: int = 9, steps: int = 12):
    """Drive one hot cache through `steps` selections; yield (indices, cached before, cached after)."""
    hot = HotCache(policy, BATCH, slots, _ARENA.row_shape, torch.float32, CPU, TOKENS)
    for indices in _selections(steps, k):
        before = [_cached(hot, b) for b in range(BATCH)]
        hits_before = int(hot.hits)
        staging = torch.full((BATCH, k, *_ARENA.row_shape), float("nan"))  # [batch, k, layers, 2, heads, dim]
        _ARENA.gather(indices, staging, hot)
        assert torch.equal(staging, _ARENA.data[torch.arange(BATCH)[:, None], indices])
        expected_hits = sum(len(before[b] & set(indices[b].tolist())) for b in range(BATCH))
        assert int(hot.hits) - hits_before == expected_hits
        _check_consistent(hot)
        yield hot, indices, before, [_cached(hot, b) for b in range(BATCH)]


@pytest.mark.parametrize("policy", [LRUEviction(), LFUEviction(), NoEviction()], ids=lambda p: p.name)
def test_rows_always_equal_the_arena_and_hits_are_exact(policy):
    for hot, _, _, after in _run(policy, slots=14):
        assert all(len(cached) <= hot.slots for cached in after)
    assert int(hot.hits) > 0 and int(hot.misses) > 0
    assert int(hot.hits) + int(hot.misses) == 12 * BATCH * 9


def test_lru_keeps_every_selected_row_and_evicts_the_least_recently_used():
    last_used: list[dict[int, int]] = [{} for _ in range(BATCH)]
    for step, (_, indices, before, after) in enumerate(_run(LRUEviction(), slots=14)):
        for b in range(BATCH):
            selected = set(indices[b].tolist())
            assert selected <= after[b]  # with slots >= k every selected row is cached
            for token in selected:
                last_used[b][token] = step
            evicted = before[b] - after[b]
            kept_unselected = after[b] - selected
            if evicted and kept_unselected:
                assert max(last_used[b][t] for t in evicted) <= min(last_used[b][t] for t in kept_unselected)


def test_lfu_evicts_the_least_used():
    uses: list[dict[int, int]] = [{} for _ in range(BATCH)]
    for _, indices, before, after in _run(LFUEviction(), slots=12):
        for b in range(BATCH):
            selected = set(indices[b].tolist())
            evicted = before[b] - after[b]
            for token in evicted:
                uses[b].pop(token)
            for token in selected:
                uses[b][token] = uses[b].get(token, 0) + 1 if token in before[b] else 1
            kept_unselected = after[b] - selected
            if evicted and kept_unselected:
                assert max(uses[b].get(t, 0) for t in evicted) <= 1 + min(uses[b][t] for t in kept_unselected)


def test_no_eviction_fills_once_and_then_never_changes():
    frozen = None
    for hot, _, before, after in _run(NoEviction(), slots=12):
        for b in range(BATCH):
            assert before[b] <= after[b]  # nothing ever leaves
        if all(len(cached) == hot.slots for cached in after):
            frozen = frozen or after
            assert after == frozen
    assert frozen is not None


def test_a_repeated_selection_is_all_hits():
    hot = HotCache(LRUEviction(), BATCH, 8, _ARENA.row_shape, torch.float32, CPU, TOKENS)
    indices = torch.tensor([[1, 5, 9, 30], [0, 2, 3, 39]])
    expected = _ARENA.data[torch.arange(BATCH)[:, None], indices]
    staging = torch.full((BATCH, 4, *_ARENA.row_shape), float("nan"))
    _ARENA.gather(indices, staging, hot)
    assert torch.equal(staging, expected)
    row_bytes = LAYERS * 2 * HEADS * DIM * 4
    assert hot.counters() == {"hot_hits": 0, "hot_misses": 8, "hot_bytes_saved": 0, "hot_bytes_fetched": 8 * row_bytes}
    staging.fill_(float("nan"))
    _ARENA.gather(indices, staging, hot)
    assert torch.equal(staging, expected)  # every row now read from the hot cache
    assert hot.counters()["hot_hits"] == 8
    assert hot.counters()["hot_bytes_saved"] == 8 * LAYERS * 2 * HEADS * DIM * 4


def test_a_hot_cache_smaller_than_the_selection_still_returns_exact_rows():
    for *_, after in _run(LRUEviction(), slots=4, k=9, steps=6):
        assert all(len(cached) <= 4 for cached in after)


def test_eviction_config_errors_name_the_field():
    with pytest.raises(okv.ConfigError, match=r"offload\.eviction\.type.*lrv.*did you mean 'lru'"):
        okv.load_config({"offload": {"eviction": {"type": "lrv"}}})
    with pytest.raises(okv.ConfigError, match=r"offload\.eviction\.type.*subclass of omnikv_runtime.policies"):
        okv.load_config({"offload": {"eviction": "omnikv_runtime.policies:LastQueryPolicy"}}, trust_remote_code=True)
    with pytest.raises(okv.ConfigError, match=r"offload\.hot_cache_tokens"):
        okv.load_config({"offload": {"hot_cache_tokens": -5}})
    spec = {"type": "omnikv_runtime.policies.lfu:LFUEviction"}
    assert isinstance(make_eviction_policy(spec, trust_remote_code=True), LFUEviction)


@pytest.mark.parametrize("eviction", ["lru", "lfu", "none"])
def test_generation_through_the_hot_cache_equals_generation_without_it(eviction):
    model = make_model("llama")
    ids, mask = make_prompt(batch=2)
    plain = okv.initialize(model, omni(budget=12))
    expected = plain.generate(ids, attention_mask=mask, max_new_tokens=12)
    plain_fetched = plain.stats()["transfer"]["bytes_fetched"]
    hot = okv.initialize(model, omni(budget=12, offload={"hot_cache_tokens": 24, "eviction": {"type": eviction}}))
    output = hot.generate(ids, attention_mask=mask, max_new_tokens=12)
    assert torch.equal(output, expected)
    transfer = hot.stats()["transfer"]
    assert transfer["hot_hits"] > 0
    assert transfer["bytes_fetched"] + transfer["hot_bytes_saved"] == plain_fetched
    assert hot.memory_report()["tiers"]["gpu_hot"] > 0


def test_hot_cache_at_full_budget_still_equals_dense():
    ids, mask = make_prompt(batch=2)
    model = make_model("llama")
    engine = okv.initialize(model, omni(budget=1.0, offload={"hot_cache_tokens": 64}))
    output = engine.generate(ids, attention_mask=mask, max_new_tokens=8)
    assert torch.equal(output, dense_reference("llama", 2, new_tokens=8))

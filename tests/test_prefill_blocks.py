"""A sparse layer's prefill chunk reads its earlier tokens back from the host tier in blocks.

The chunk's attention over them is merged block by block (log-sum-exp, float32): the result equals
dense attention over every token, whatever the block size, and no tensor the sparse layers' attention
reads grows with the context (the blocks stay at ``prefill.read_block_tokens`` tokens).
"""

from __future__ import annotations

import pytest
import torch
from okv_testlib import SPARSE_LAYERS, make_model, make_prompt, omni, reference_attention

import omnikv_runtime as okv
from omnikv_runtime.cache import prefill_blocks
from omnikv_runtime.cache.prefill_blocks import EarlierKV, attend_over_blocks, check_attention_options
from omnikv_runtime.transfer import HostArena, TorchTransferEngine


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch, as generate computes them."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def _chunked_logits(model, ids, mask, chunk: int, cache) -> torch.Tensor:
    """Logits of a prefill of ``ids`` in chunks of ``chunk`` tokens through ``cache``."""
    positions = _positions(mask)
    parts = []
    with torch.no_grad():
        for start in range(0, ids.shape[1], chunk):
            stop = min(start + chunk, ids.shape[1])
            out = model(
                ids[:, start:stop],
                attention_mask=mask[:, :stop],
                position_ids=positions[:, start:stop],
                cache=cache,
                use_cache=True,
            )
            parts.append(out.logits)
    return torch.cat(parts, dim=1)


def _dense_logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, attention_mask=mask, position_ids=_positions(mask)).logits


@pytest.mark.parametrize(
    "batch, chunk, block, attn",
    [
        (1, 7, 7, "sdpa"),  # blocks that divide each chunk's past
        (1, 7, 5, "sdpa"),  # blocks that do not
        (1, 16, 1000, "sdpa"),  # one block
        (2, 6, 4, "sdpa"),  # a left-padded row: the model's mask, sliced per block
        (2, 9, 10, "eager"),  # an additive float mask
    ],
)
def test_chunked_prefill_with_block_reads_equals_unchunked_dense(batch, chunk, block, attn):
    ids, mask = make_prompt(batch, length=43)
    reference = _dense_logits(make_model("llama", attn_implementation=attn), ids, mask)
    model = make_model("llama", attn_implementation=attn)
    engine = okv.initialize(model, omni(budget=1.0, prefill={"chunk_size": chunk, "read_block_tokens": block}))
    cache = engine.new_cache(prompt_tokens=ids.shape[1])
    reads = []
    arena_read = HostArena.read
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HostArena, "read", lambda self, *a, **k: reads.append(a) or arena_read(self, *a, **k))
        logits = _chunked_logits(model, ids, mask, chunk, cache)
    valid = mask.bool()
    # logits of up to 6.4: transformers' own chunked prefill (DynamicCache) differs from its unchunked one by
    # up to 1.4e-5 here, as does this one; a wrong block (a column dropped or counted twice) moves them by >1e-2
    torch.testing.assert_close(logits[valid], reference[valid], rtol=1e-5, atol=5e-5)
    # the sparse layers really read their earlier tokens back, in blocks of at most `block`
    last_past = (ids.shape[1] - 1) // chunk * chunk  # tokens before the last chunk
    assert reads and max(stop - start for _, stop, start in reads) == min(block, last_past)
    assert cache.get_seq_length() == ids.shape[1]


def test_bundled_model_chunked_prefill_with_block_reads_equals_dense(bundled):
    model, tokenizer = bundled
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt").input_ids[:, :60]
    mask = torch.ones_like(ids)
    reference = _dense_logits(model, ids, mask)
    engine = okv.initialize(model, {"prefill": {"chunk_size": 16, "read_block_tokens": 12}})
    assert engine.plan.sparse_layers
    logits = _chunked_logits(model, ids, mask, 16, engine.new_cache(prompt_tokens=ids.shape[1]))
    tolerance = 1e-4 if model.dtype == torch.float32 else 5e-2
    torch.testing.assert_close(logits, reference, rtol=tolerance, atol=tolerance)


def _largest_sparse_tensors(length: int, monkeypatch) -> dict[str, int]:
    """The largest token count of anything the sparse layers' prefill attention reads or is given."""
    largest = {"read": 0, "keys": 0, "reads": 0}
    arena_read, block_attention = HostArena.read, prefill_blocks.block_attention

    def read(self, slot, stop, start=0):
        largest["read"] = max(largest["read"], stop - start)
        largest["reads"] += 1
        return arena_read(self, slot, stop, start)

    def attention(query, keys, *args, **kwargs):
        largest["keys"] = max(largest["keys"], keys.shape[2])
        return block_attention(query, keys, *args, **kwargs)

    monkeypatch.setattr(HostArena, "read", read)
    monkeypatch.setattr(prefill_blocks, "block_attention", attention)
    ids, mask = make_prompt(1, length=length)
    engine = okv.initialize(make_model("llama"), omni(budget=1.0, prefill={"chunk_size": 8, "read_block_tokens": 8}))
    engine.generate(ids, attention_mask=mask, max_new_tokens=1)
    monkeypatch.undo()
    return largest


def test_sparse_prefill_tensors_do_not_grow_with_the_context(monkeypatch):
    short, long = _largest_sparse_tensors(32, monkeypatch), _largest_sparse_tensors(128, monkeypatch)
    assert short["read"] == long["read"] == 8  # a block, whatever the context
    assert short["keys"] == long["keys"] == 8  # a block or the chunk's own keys
    # every sparse layer reads every earlier block of every chunk: sum over chunks c of ceil(8c / 8)
    assert long["reads"] == len(SPARSE_LAYERS) * sum(range(128 // 8))


def _arena_of(keys: torch.Tensor, values: torch.Tensor, slot: int = 1) -> HostArena:
    engine = TorchTransferEngine(torch.device("cpu"), torch.device("cpu"), pin_memory=False)
    batch, kv_heads, tokens, dim = keys.shape
    arena = HostArena(engine, batch, 2, kv_heads, dim, keys.dtype, tokens)
    arena.append(slot, keys, values)
    return arena


@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive", "padding"])
@pytest.mark.parametrize("block", [1, 3, 10, 64])
def test_attend_over_blocks_equals_attention_over_every_column(mask_kind, block):
    """GQA (4 query heads over 2 KV heads), a chunk of 5 after 21 earlier tokens, each mask format."""
    generator = torch.Generator().manual_seed(3)
    batch, heads, kv_heads, dim, past, count = 2, 4, 2, 8, 21, 5
    query = torch.randn(batch, heads, count, dim, generator=generator)
    keys = torch.randn(batch, kv_heads, past + count, dim, generator=generator)
    values = torch.randn(batch, kv_heads, past + count, dim, generator=generator)
    causal = torch.ones(count, past + count, dtype=torch.bool).tril(past)
    allowed = causal.expand(batch, 1, count, past + count).clone()
    allowed[1, :, :, :6] = False  # row 1 is left-padded by 6 columns
    model_mask = {
        "none": None,
        "bool": allowed,
        "additive": torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min),
        "padding": allowed[:, 0, -1].long(),  # flash-attention style [batch, columns]
    }[mask_kind]
    if mask_kind == "none":
        allowed = causal.expand(batch, 1, count, past + count)
    arena = _arena_of(keys[:, :, :past], values[:, :, :past])
    earlier = EarlierKV(arena, 1, past, block)
    output = attend_over_blocks(query, keys[:, :, past:], values[:, :, past:], earlier, model_mask, 0.3)
    expected = reference_attention(query, keys, values, allowed, 0.3)
    torch.testing.assert_close(output.double(), expected, rtol=1e-5, atol=1e-5)
    assert len(earlier.blocks()) == -(-past // block)


def test_attention_options_the_block_prefill_does_not_compute_are_refused():
    check_attention_options({"softcap": None, "sliding_window": None, "dropout": 0.0})
    with pytest.raises(okv.UnsupportedModelError, match="softcap=50.0"):
        check_attention_options({"softcap": 50.0})
    with pytest.raises(okv.UnsupportedModelError, match="sliding_window=4096"):
        check_attention_options({"sliding_window": 4096})


@pytest.mark.parametrize("value", [0, -1, 1.5, "4096", 10**12, None])
def test_bad_read_block_tokens_names_the_field(value):
    with pytest.raises(okv.ConfigError, match=r"prefill\.read_block_tokens"):
        okv.load_config({"prefill": {"read_block_tokens": value}})

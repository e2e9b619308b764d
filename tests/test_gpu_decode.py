"""GPU checks of the static decode step (``pytest -m gpu`` on a CUDA machine).

- the decode kernels (split-K attention, fused scoring, layer-slice gathers, write-back rows) equal
  their torch references on random data, with poisoned outputs and unread regions; a row's attention
  has the same bits whatever the batch and the buffer's capacity;
- 256 decode steps replayed from a CUDA graph give the same greedy tokens as the same step run
  eagerly and as transformers' own ``generate`` through the cache, at batch 1 and 4, in GPU mode
  and offload mode (with and without a hot cache), with the tail ring wrapping;
- at budget 1.0 the graph-captured engine equals plain dense generation;
- the fused layers' kernels equal transformers' ops (RMSNorm within rounding), and a fused engine
  gives the unfused tokens.
"""

from __future__ import annotations

import pytest
import torch
from okv_testlib import cuda_llama, cuda_prompt

import omnikv_runtime as okv
from omnikv_runtime.kernels import KVSource, decode_attention, decode_attention_torch, max_head_logits
from omnikv_runtime.kernels.head_scores import max_head_logits_torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

NEW_TOKENS = 256


@pytest.fixture(scope="module")
def cuda_model():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    # initializer_range 0.2: tokens depend on the context (HF's 0.02 gives near-constant output)
    return cuda_llama(initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0)


def _config(host_tier: str, budget, **sections) -> dict:
    config = {
        "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": budget},
        "offload": {"device": host_tier},
        "prefill": {"chunk_size": 128},
    }
    for name, values in sections.items():
        config.setdefault(name, {}).update(values)
    return config


# kernels ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_kernel_equals_the_reference(dtype):
    torch.manual_seed(0)
    batch, heads, kv_heads, dim, tokens, ring, k = 3, 32, 8, 128, 5000, 300, 700
    query = torch.randn(batch, heads, dim, device="cuda", dtype=dtype)
    keys = torch.randn(batch, kv_heads, tokens, dim, device="cuda", dtype=dtype)
    values = torch.randn_like(keys)
    length = torch.tensor([4321], device="cuda")
    keys[:, :, 4321:] = float("nan")  # never read: past the length
    values[:, :, 4321:] = float("nan")
    mask = torch.rand(batch, tokens, device="cuda") > 0.1
    packed = torch.randn(batch, ring, 3, 2, kv_heads, dim, device="cuda", dtype=dtype)
    count = torch.tensor([123], device="cuda")
    packed[:, 123:] = float("nan")
    index = torch.sort(torch.randint(0, 4321, (batch, k), device="cuda"), dim=-1).values
    dense = KVSource(keys.transpose(1, 2), values.transpose(1, 2), length=length, mask=mask)
    tail = KVSource(packed[:, :, 1, 0], packed[:, :, 1, 1], length=count)
    indexed = KVSource(keys.transpose(1, 2), values.transpose(1, 2), index=index, mask=mask[:, :k])
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for sources in ([dense], [dense, tail], [indexed, tail], [tail]):
        out = torch.full((batch, heads, dim), float("nan"), device="cuda", dtype=dtype)
        decode_attention(query, sources, 0.088, out=out)
        reference = decode_attention_torch(query, sources, 0.088)
        assert not torch.isnan(out).any()
        error = (out.float() - reference.float()).norm() / reference.float().norm()
        assert error < tolerance, (len(sources), error)


def test_a_rows_decode_attention_has_the_same_bits_in_any_batch_and_buffer():
    """bf16 at Llama-3-8B heads: row 0 alone, in a batch of 4 (other rows different) and in a buffer 700
    columns wider gives identical bits, at lengths where the kernel splits a row into many ranges."""
    torch.manual_seed(0)
    query = torch.randn(4, 32, 128, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(4, 8, 34000, 128, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)

    def attend(rows: int, columns: int, length: int) -> torch.Tensor:
        lengths = torch.full((rows,), length, device="cuda")
        source = KVSource(keys[:rows, :, :columns].transpose(1, 2), values[:rows, :, :columns].transpose(1, 2), lengths)
        out = torch.full((rows, 32, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
        return decode_attention(query[:rows], [source], 0.088, out=out)

    for length, columns in [(4100, 4128), (32800, 32832), (33000, 33532)]:
        alone = attend(1, columns, length)
        assert torch.equal(attend(4, columns, length)[0], alone[0]), ("batch 4", length)
        assert torch.equal(attend(1, columns + 400, length), alone), ("a wider buffer", length)


def test_scores_kernel_equals_the_reference():
    torch.manual_seed(0)
    query = torch.randn(2, 32, 128, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(2, 8, 9000, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    valid = torch.rand(2, 9000, device="cuda") > 0.2
    limit = torch.tensor([8000], device="cuda")
    fused = max_head_logits(query, keys, 0.088, limit=limit, valid=valid)
    reference = max_head_logits_torch(query, keys, 0.088, limit=limit, valid=valid)
    finite = torch.isfinite(reference)
    assert torch.equal(finite, torch.isfinite(fused)) and finite.sum() > 10000
    assert torch.allclose(fused[finite], reference[finite], atol=0.05, rtol=0.02)
    k = 512  # the top-k sets agree up to near-ties
    overlap = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(fused.topk(k).indices, reference.topk(k).indices)]
    assert min(overlap) > 0.97 * k


def test_layer_slice_gather_and_write_back_from_pinned_memory():
    from omnikv_runtime.transfer.triton_gather import copy_row, gather_rows

    torch.manual_seed(0)
    arena = torch.randn(2, 1000, 4, 2, 8, 128, dtype=torch.bfloat16).pin_memory()
    indices = torch.randint(0, 1000, (2, 300), device="cuda")
    staging = torch.full((2, 300, 4, 2, 8, 128), float("nan"), device="cuda", dtype=torch.bfloat16)
    for slot in range(4):
        gather_rows(arena[:, :, slot], indices, staging[:, :, slot])
    torch.cuda.synchronize()
    expected = arena.cuda()[torch.arange(2, device="cuda")[:, None], indices]
    assert torch.equal(staging, expected)
    ring = torch.randn(2, 16, 4, 2, 8, 128, device="cuda", dtype=torch.bfloat16)
    before = arena.clone()
    copy_row(arena, torch.tensor([777], device="cuda"), ring, torch.tensor([5], device="cuda"))
    torch.cuda.synchronize()
    assert torch.equal(arena[:, 777], ring[:, 5].cpu())
    assert torch.equal(arena[:, :777], before[:, :777]) and torch.equal(arena[:, 778:], before[:, 778:])


def test_prefill_read_started_ahead_equals_the_host_tier():
    """A prefetched read of a layer's earlier tokens returns them, after a write queued before it."""
    from omnikv_runtime.transfer.triton_engine import TritonTransferEngine

    engine = TritonTransferEngine(torch.device("cuda"), torch.device("cpu"), pin_memory=True)
    arena = engine.allocate_host((2, 900, 3, 2, 8, 128), torch.bfloat16)
    arena.copy_(torch.randn(arena.shape).to(torch.bfloat16))
    keys = torch.randn(2, 8, 100, 128, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    engine.write_rows(arena, 1, 700, keys, values)  # queued on the transfer stream before the read
    engine.prefetch_rows(arena, 1, 800)
    torch.cuda._sleep(50_000_000)  # the compute stream is busy meanwhile
    read_keys, read_values = engine.read_rows(arena, 1, 800)
    torch.cuda.synchronize()
    assert torch.equal(read_keys[:, :, 700:].cpu(), keys.cpu()) and torch.equal(read_values[:, :, 700:], values)
    assert torch.equal(read_keys[:, :, :700].cpu(), arena[:, :700, 1, 0].transpose(1, 2))
    assert engine._ahead == {}  # taken
    engine.prefetch_rows(arena, 2, 800)
    other = engine.read_rows(arena, 2, 600)[0]  # another range: read afresh, not the prefetched one
    assert torch.equal(other.cpu(), arena[:, :600, 2, 0].transpose(1, 2))
    engine.prefetch_rows(arena, 0, 900, 450)  # a block of a chunked prefill's read-back, started ahead
    torch.cuda._sleep(50_000_000)
    block_keys, block_values = engine.read_rows(arena, 0, 900, 450)
    assert torch.equal(block_values.cpu(), arena[:, 450:900, 0, 1].transpose(1, 2))
    assert torch.equal(block_keys.cpu(), arena[:, 450:900, 0, 0].transpose(1, 2)) and engine._ahead == {}


# the captured step ----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize(
    ("offload", "extra"),
    [("none", {}), ("cpu", {}), ("cpu", {"offload": {"hot_cache_tokens": 48}})],
    ids=["gpu", "offload", "offload-hot"],
)
def test_replayed_steps_equal_eager_steps_and_transformers(cuda_model, batch, offload, extra):
    """256 graph-replayed steps, tail ring of 64 (it wraps 3 times), budget 24 of 300 tokens."""
    ids, mask = cuda_prompt(batch, 300, pad=37)
    config = _config(offload, 24, omnikv={"tail_tokens": 64}, **extra)
    graph = okv.initialize(cuda_model, {**config, "generation": {"cuda_graphs": True}})
    out_graph = graph.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    assert graph.stats()["cuda_graph"] is True
    eager = okv.initialize(cuda_model, {**config, "generation": {"cuda_graphs": False}})
    out_eager = eager.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    assert eager.stats()["cuda_graph"] is False
    assert out_graph.shape == (batch, 300 + NEW_TOKENS)
    assert torch.equal(out_graph, out_eager)
    cache = eager.new_cache(reserve_tokens=300 + NEW_TOKENS, prompt_tokens=300)
    with torch.inference_mode():
        out_hf = cuda_model.generate(
            ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, past_key_values=cache
        )
    assert torch.equal(out_graph, out_hf)
    # the host tier holds every token, the generated ones included (write-back ran in the graph)
    graph_cache = graph.last_cache
    for segment in graph_cache.tiers.segments:
        assert segment.arena.lengths == [300 + NEW_TOKENS - 1] * len(segment.sparse_layers)
    assert graph_cache.decode_steps == NEW_TOKENS - 1


@pytest.mark.parametrize("offload", ["none", "cpu"])
def test_graph_at_full_budget_equals_dense(cuda_model, offload):
    """Without fused layers: transformers' own dense generate. With them: our dense path, fused alike."""
    ids, mask = cuda_prompt(4, 300, pad=37)
    with torch.inference_mode():
        dense = cuda_model.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False, pad_token_id=0)
    unfused = {"generation": {"fused_layers": False}}
    engine = okv.initialize(cuda_model, {**_config(offload, 1.0), **unfused})
    output = engine.generate(ids, attention_mask=mask, max_new_tokens=64, pad_token_id=0)
    assert engine.stats()["cuda_graph"] is True
    assert torch.equal(output, dense)
    fused = okv.initialize(cuda_model, _config(offload, 1.0))
    assert fused.fused_layers
    ours_dense = okv.initialize(cuda_model, _config("none", 1.0, omnikv={"enabled": False}))
    expected = ours_dense.generate(ids, attention_mask=mask, max_new_tokens=64, pad_token_id=0)
    assert torch.equal(fused.generate(ids, attention_mask=mask, max_new_tokens=64, pad_token_id=0), expected)
    # fusion regroups the same math: transformers' tokens, logits within rounding
    assert torch.equal(expected, dense)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layer_kernels_equal_transformers_ops(dtype):
    from omnikv_runtime.kernels import layer_ops as ops

    torch.manual_seed(0)
    hidden = torch.randn(5, 3, 4096, device="cuda", dtype=dtype)
    weight = torch.randn(4096, device="cuda", dtype=dtype)
    normed, reference = ops.rms_norm(hidden, weight, 1e-5), ops.rms_norm_torch(hidden, weight, 1e-5)
    assert normed.dtype == dtype and not torch.equal(normed, hidden)
    # the sum of squares runs in another order and rsqrt differs in its last bit: one rounding step apart
    torch.testing.assert_close(normed, reference, rtol=1e-2 if dtype == torch.bfloat16 else 2e-6, atol=1e-6)
    q = torch.randn(2, 9, 32 * 128, device="cuda", dtype=dtype).view(2, 9, 32, 128)
    k = torch.randn(2, 9, 8 * 128, device="cuda", dtype=dtype).view(2, 9, 8, 128)
    cos, sin = torch.randn(1, 9, 128, device="cuda", dtype=dtype), torch.randn(1, 9, 128, device="cuda", dtype=dtype)
    q_rot, k_rot = ops.rotary_embedding(q, k, cos, sin)
    q_ref, k_ref = ops.rotary_embedding_torch(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    # within one rounding of transformers' ops: the GPU may fuse a product with the sum that follows,
    # and where the two products cancel, one rounding of a product (|q·cos| up to ~5) is what is left
    one_rounding = {"rtol": 8e-3, "atol": 4e-2} if dtype == torch.bfloat16 else {"rtol": 2e-6, "atol": 2e-6}
    torch.testing.assert_close(q_rot, q_ref, **one_rounding)
    torch.testing.assert_close(k_rot, k_ref, **one_rounding)
    assert not torch.equal(q_rot, q.transpose(1, 2))
    gate = torch.randn(3, 14336, device="cuda", dtype=dtype) * 4
    up = torch.randn(3, 14336, device="cuda", dtype=dtype)
    torch.testing.assert_close(ops.silu_mul(gate, up), ops.silu_mul_torch(gate, up), **one_rounding)


def test_a_second_call_of_the_same_shape_replays_the_kept_graph(cuda_model):
    """The engine keeps the captured step; a later call (another prompt, the same shape) reuses it exactly."""
    engine = okv.initialize(cuda_model, _config("cpu", 24, offload={"hot_cache_tokens": 48}))
    reference = okv.initialize(cuda_model, {**_config("cpu", 24), "generation": {"cuda_graphs": False}})
    for seed, new in ((1, 40), (2, 40), (3, 25)):
        ids, mask = cuda_prompt(2, 300, pad=37, seed=seed)
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=new, pad_token_id=0)
        assert engine.stats()["cuda_graph"] is True
        if seed > 1:
            assert engine.stats()["graph_capture_seconds"] == 0.0  # nothing recaptured
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=new, pad_token_id=0)
        assert torch.equal(out, expected)


def test_prefill_chunk_attention_is_causal_at_the_bottom_right():
    from omnikv_runtime.cache.attention import causal_chunk_attention

    torch.manual_seed(0)
    query = torch.randn(2, 32, 300, 128, device="cuda", dtype=torch.bfloat16)
    keys = torch.randn(2, 8, 1000, 128, device="cuda", dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    out, _ = causal_chunk_attention(query, keys, values, 0.088)
    allowed = torch.ones(300, 1000, dtype=torch.bool, device="cuda").tril(diagonal=700)
    reference = torch.nn.functional.scaled_dot_product_attention(
        query.float(),
        keys.float().repeat_interleave(4, 1),
        values.float().repeat_interleave(4, 1),
        allowed,
        scale=0.088,
    )
    error = (out.float() - reference.transpose(1, 2)).norm() / reference.norm()
    assert error < 1e-2


def test_sampling_in_the_graph_is_seeded_and_varies(cuda_model):
    ids, mask = cuda_prompt(1, 100, pad=0)
    engine = okv.initialize(cuda_model, _config("none", 16))
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(engine.generate(ids, max_new_tokens=48, do_sample=True, temperature=1.0, top_k=50, top_p=0.9))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    greedy = engine.generate(ids, max_new_tokens=48)
    assert torch.equal(engine.generate(ids, max_new_tokens=48, do_sample=True, top_k=1), greedy)

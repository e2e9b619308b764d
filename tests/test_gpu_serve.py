"""GPU checks of continuous batching (``pytest -m gpu`` on a CUDA machine).

- the decode attention kernel with a length per batch row (a server's rows at their own
  positions) equals its torch reference, with the columns past each row's length poisoned;
- requests that join a running batch (recorded again in a CUDA graph whenever a request joins or
  leaves) get exactly the greedy tokens ``Engine.generate`` gives each alone, in GPU mode and
  offload mode;
- a lone request in a recorded step of four slots fetches only its own rows from the host tier (an idle
  slot's padded selection reads nothing), bf16 and FP8, and gets its solo tokens;
- with a prefix cache, questions about one document reuse its KV in place and, with the slots overwritten,
  from the pools, and answer as ``Engine.generate`` does.
"""

from __future__ import annotations

import threading

import pytest
import torch
from okv_testlib import cuda_llama

import omnikv_runtime as okv
from omnikv_runtime.kernels import KVSource, decode_attention, decode_attention_torch
from omnikv_runtime.serve.batch import PrefillJob, SlotBatch
from omnikv_runtime.serve.requests import ServeRequest
from omnikv_runtime.serve.scheduler import Scheduler

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


class WordTokenizer:
    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(f"w{i}" for i in ids)


def small_engine(host_tier: str, host_dtype: str = "auto") -> okv.Engine:
    """A small random Llama on the card with filter layers 1 and 4, a 10% budget and prefill chunks of 256."""
    model = cuda_llama(initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    config = {
        "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": 0.1, "min_token_budget": 8},
        "offload": {"device": host_tier, "host_dtype": host_dtype},
        "prefill": {"chunk_size": 256},
    }
    return okv.initialize(model, config, tokenizer=WordTokenizer())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_with_a_length_per_row_equals_the_reference(dtype):
    torch.manual_seed(0)
    batch, heads, kv_heads, dim, tokens = 3, 32, 8, 128, 3000
    query = torch.randn(batch, heads, dim, device="cuda", dtype=dtype)
    keys = torch.randn(batch, kv_heads, tokens, dim, device="cuda", dtype=dtype)
    values = torch.randn_like(keys)
    lengths = torch.tensor([2999, 17, 1500], device="cuda")
    for row, length in enumerate(lengths.tolist()):
        keys[row, :, length:] = float("nan")  # never read: past the row's own length
        values[row, :, length:] = float("nan")
    source = KVSource(keys.transpose(1, 2), values.transpose(1, 2), length=lengths)
    got = decode_attention(query, [source], 0.1)
    clean = KVSource(torch.nan_to_num(keys).transpose(1, 2), torch.nan_to_num(values).transpose(1, 2), length=lengths)
    want = decode_attention_torch(query, [clean], 0.1)
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2 if dtype == torch.bfloat16 else 1e-4, rtol=0)


@pytest.mark.parametrize("host_tier", ["none", "cpu"])
def test_joining_requests_get_their_solo_tokens_with_a_recorded_step(host_tier):
    engine = small_engine(host_tier)
    generator = torch.Generator().manual_seed(3)
    lengths, new_tokens = [1500, 700, 1100, 300, 900, 1300], [40, 64, 25, 50, 33, 45]
    prompts = [torch.randint(3, 512, (n,), generator=generator).tolist() for n in lengths]
    alone = []
    for ids, count in zip(prompts, new_tokens, strict=True):
        out = engine.generate(torch.tensor([ids], device="cuda"), max_new_tokens=count, do_sample=False)
        alone.append(out[0, len(ids) :].tolist())
    scheduler = Scheduler(engine, max_batch=4, max_context=2048, max_new_tokens=64)
    got = {i: [] for i in range(len(prompts))}
    done = threading.Event()
    finished = []

    def sink(i):
        def on_event(event):
            got[i].extend(event.token_ids)
            if event.finish_reason is not None:
                finished.append(i)
                if len(finished) == len(prompts):
                    done.set()

        return on_event

    scheduler.start()
    try:
        for i, (ids, count) in enumerate(zip(prompts, new_tokens, strict=True)):
            scheduler.submit(ServeRequest(f"r{i}", tuple(ids), count, temperature=0.0), sink(i))
        assert done.wait(300)
    finally:
        scheduler.shutdown()
    assert scheduler.batch.use_graph and scheduler.batch.captures >= 2
    mismatched = [i for i in range(len(prompts)) if got[i] != alone[i]]
    assert not mismatched, [(i, got[i], alone[i]) for i in mismatched]


@pytest.mark.parametrize("host_dtype", ["auto", "float8_e4m3fn"])
def test_a_lone_request_in_a_recorded_step_fetches_only_its_own_rows(host_dtype):
    engine = small_engine("cpu", host_dtype)
    prompt = torch.randint(3, 512, (1200,), generator=torch.Generator().manual_seed(5)).tolist()
    batch = SlotBatch(engine, rows=4, capacity=1300, new_tokens=40)
    assert batch.use_graph
    job = PrefillJob(batch, 1, prompt, 256)
    logits = None
    while logits is None:
        logits = job.advance()
    batch.join(job, int(logits.argmax()))
    tokens = [int(logits.argmax())]
    request = batch.cache.requests[1]
    row_bytes = sum(arena.fetch_row_bytes for arena in batch.cache.tiers.arenas if arena is not None)
    for _ in range(30):  # a warm-up, a recording, then replays
        before = engine.transfer.stats.bytes_fetched
        chosen = batch.step().argmax(dim=-1)
        assert engine.transfer.stats.bytes_fetched - before == request.token_budget * row_bytes
        batch.ids[:, 0].copy_(chosen)
        tokens.append(int(chosen[1]))
    assert batch.captures == 1
    alone = engine.generate(torch.tensor([prompt], device="cuda"), max_new_tokens=len(tokens), do_sample=False)
    assert tokens == alone[0, len(prompt) :].tolist()


@pytest.mark.parametrize("host_tier", ["cpu", "none"])
def test_questions_about_one_document_reuse_its_kv_in_place_and_from_the_pools(host_tier):
    """A prefix cache on the card: questions one after another about one document reuse its blocks where their
    slot holds them (no copy), then, with the slots overwritten between requests, copied from the pools; every
    answer equals ``Engine.generate``'s."""
    engine = small_engine(host_tier)
    generator = torch.Generator().manual_seed(5)
    document = torch.randint(3, 512, (1024,), generator=generator).tolist()
    questions = [document + torch.randint(3, 512, (n,), generator=generator).tolist() for n in (7, 30, 3)]
    alone = []
    for ids in questions:
        out = engine.generate(torch.tensor([ids], device="cuda"), max_new_tokens=24, do_sample=False)
        alone.append(out[0, len(ids) :].tolist())
    scheduler = Scheduler(engine, max_batch=2, max_context=1536, max_new_tokens=32, prefix_cache_bytes=2 * 10**8)
    answers = []
    scheduler.start()
    try:
        for overwrite in (False, True):
            for i, ids in enumerate(questions):
                if overwrite:  # the slots' rows are noise now: whatever is reused comes from the pools
                    scheduler.prefixes.forget()
                    tiers = scheduler.batch.cache.tiers
                    for layer in tiers.dense_layers:
                        layer.key_buffer.normal_()
                        layer.value_buffer.normal_()
                    for arena in tiers.arenas:
                        if arena is not None:
                            arena.data.normal_()
                got, done = [], threading.Event()

                def on_event(event, got=got, done=done):
                    got.extend(event.token_ids)
                    if event.finish_reason is not None:
                        done.set()

                scheduler.submit(ServeRequest(f"q{i}{overwrite}", tuple(ids), 24, temperature=0.0), on_event)
                assert done.wait(120)
                answers.append(got)
        metrics = scheduler.metrics()
    finally:
        scheduler.shutdown()
    assert answers == alone + alone
    assert metrics["prefix_cache_in_place_tokens_total"] == 2 * 1024  # the first run's questions 2 and 3
    assert metrics["prefix_cache_hit_tokens_total"] == 5 * 1024  # and the second run's three, from the pools

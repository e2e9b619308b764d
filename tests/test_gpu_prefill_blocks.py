"""GPU checks of the block read-back prefill (``pytest -m gpu`` on a CUDA machine).

- a chunk's attention over a pinned host tier read back in blocks (fused kernels in bfloat16, the next
  block read on the transfer stream) equals float64 attention over every column;
- the GPU memory it allocates does not grow with the context.
"""

from __future__ import annotations

import pytest
import torch
from okv_testlib import reference_attention

from omnikv_runtime.cache.prefill_blocks import EarlierKV, attend_over_blocks

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

HEADS, KV_HEADS, DIM, CHUNK, BLOCK = 32, 8, 128, 512, 1024


def _earlier(past: int, generator: torch.Generator) -> tuple[EarlierKV, torch.Tensor, torch.Tensor]:
    from omnikv_runtime.transfer.host_arena import HostArena
    from omnikv_runtime.transfer.triton_engine import TritonTransferEngine

    engine = TritonTransferEngine(torch.device("cuda"), torch.device("cpu"), pin_memory=True)
    keys = torch.randn(1, KV_HEADS, past, DIM, generator=generator).to("cuda", torch.bfloat16)
    values = torch.randn(1, KV_HEADS, past, DIM, generator=generator).to("cuda", torch.bfloat16)
    arena = HostArena(engine, 1, 2, KV_HEADS, DIM, torch.bfloat16, past)
    arena.append(1, keys, values)
    engine.synchronize()
    return EarlierKV(arena, 1, past, BLOCK), keys, values


def test_block_prefill_on_cuda_equals_attention_over_every_column():
    generator = torch.Generator().manual_seed(0)
    earlier, keys, values = _earlier(5000, generator)  # blocks of 1,024 that do not divide 5,000
    query = torch.randn(1, HEADS, CHUNK, DIM, generator=generator).to("cuda", torch.bfloat16)
    own_keys = torch.randn(1, KV_HEADS, CHUNK, DIM, generator=generator).to("cuda", torch.bfloat16)
    own_values = torch.randn(1, KV_HEADS, CHUNK, DIM, generator=generator).to("cuda", torch.bfloat16)
    output = attend_over_blocks(query, own_keys, own_values, earlier, None, DIM**-0.5)
    all_keys, all_values = torch.cat((keys, own_keys), dim=2), torch.cat((values, own_values), dim=2)
    allowed = torch.ones(CHUNK, 5000 + CHUNK, dtype=torch.bool, device="cuda").tril(5000)[None, None]
    expected = reference_attention(query, all_keys, all_values, allowed, DIM**-0.5)
    torch.testing.assert_close(output.double(), expected, rtol=2e-2, atol=2e-2)


def test_block_prefill_memory_does_not_grow_with_the_context():
    peaks = []
    for past in (8 * BLOCK, 64 * BLOCK):
        generator = torch.Generator().manual_seed(1)
        earlier, keys, values = _earlier(past, generator)
        del keys, values
        query = torch.randn(1, HEADS, CHUNK, DIM, generator=generator).to("cuda", torch.bfloat16)
        own = torch.randn(1, KV_HEADS, CHUNK, DIM, generator=generator).to("cuda", torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        attend_over_blocks(query, own, own, earlier, None, DIM**-0.5)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - before)
    block_bytes = 2 * KV_HEADS * BLOCK * DIM * 2
    assert peaks[1] <= peaks[0] + block_bytes  # 8x the context, the same few blocks

"""The split-K decode attention kernel under TRITON_INTERPRET=1, on CPU tensors (its GPU run is in
test_gpu_decode.py): a row's result has the same bits whatever else is in the batch and whatever the
buffer's capacity, because the kernel splits a row into the same ranges in every case.

The interpreter must be chosen before triton is imported, so the check runs in a child process. It
runs in float32: the interpreter does not compute bfloat16 products the way the GPU does.
"""

from __future__ import annotations

from okv_testlib import run_in_triton_interpreter

CHECK = r"""
import torch
from omnikv_runtime.kernels.decode_attention import KVSource, decode_attention_torch
from omnikv_runtime.kernels.decode_attention_triton import _split_plan, decode_attention_triton

# the ranges of a row depend on its columns, the KV heads and the card, not on the batch
assert _split_plan(131072, 8, 132, 128) == (128, 1024)
assert _split_plan(131584, 8, 132, 128) == (129, 1024)  # a wider buffer: the same ranges, one more past the end
assert _split_plan(2048, 8, 132, 128) == (8, 256)

torch.manual_seed(0)
q_heads, kv_heads, dim, multiprocessors = 8, 2, 16, 4  # 16 ranges a request
q = torch.randn(3, q_heads, dim)
k, v = torch.randn(3, 5000, kv_heads, dim), torch.randn(3, 5000, kv_heads, dim)
tail_k, tail_v = torch.randn(3, 40, kv_heads, dim), torch.randn(3, 40, kv_heads, dim)


def attend(rows, columns, length):
    sources = [
        KVSource(k[:rows, :columns], v[:rows, :columns], length=torch.tensor([length] * rows)),
        KVSource(tail_k[:rows], tail_v[:rows], length=torch.tensor([7] * rows)),
    ]
    out = torch.full((rows, q_heads, dim), float("nan"))
    return decode_attention_triton(q[:rows], sources, 0.25, multiprocessors, out), sources


for length, columns in [(4000, 4096), (4000, 4160), (1500, 4800)]:
    one, sources = attend(1, columns, length)
    three, _ = attend(3, columns, length)
    wider, _ = attend(1, columns + 60, length)
    reference = decode_attention_torch(q[:1], sources, 0.25)
    assert (one - reference).abs().max() < 1e-5, (length, columns)
    assert torch.equal(three[0], one[0]), ("another batch", length, columns)
    assert torch.equal(wider, one), ("a wider buffer", length, columns)
print("ok")
"""


def test_a_rows_attention_has_the_same_bits_whatever_the_batch_and_capacity():
    run_in_triton_interpreter(CHECK)

"""The Triton gather and write-back kernels under TRITON_INTERPRET=1, on CPU tensors (the GPU run is in test_gpu.py).

The interpreter must be chosen before triton is imported, so the checks run in a child process.
"""

from __future__ import annotations

from okv_testlib import run_in_triton_interpreter

CHECK = r"""
import torch
from omnikv_runtime.transfer.triton_gather import gather_rows

torch.manual_seed(0)
# a host arena [batch, tokens, layers, 2, kv_heads, head_dim] and rows longer than one block
for shape, k, programs in [((2, 50, 3, 2, 2, 8), 7, 4), ((1, 20, 5000), 3, 2), ((3, 9, 4, 2, 1, 16), 9, 32)]:
    source = torch.randn(*shape).to(torch.bfloat16)
    indices = torch.stack([torch.randperm(shape[1])[:k] for _ in range(shape[0])])
    out = torch.full((shape[0], k, *shape[2:]), float("nan"), dtype=torch.bfloat16)
    gather_rows(source, indices, out, num_programs=programs)
    expected = source[torch.arange(shape[0])[:, None], indices]
    assert torch.equal(out, expected), shape
# without a hot cache a -1 lane (padding) reads nothing and writes nothing: its poisoned row stays poisoned
source = torch.randn(3, 40, 3, 2, 2, 8).to(torch.bfloat16)
lanes = torch.tensor([[5, 39, -1, 0], [-1, -1, -1, -1], [7, -1, 12, 30]])
out = torch.full((3, 4, 3, 2, 2, 8), float("nan"), dtype=torch.bfloat16)
gather_rows(source, lanes, out, num_programs=2)
for b in range(3):
    for j in range(4):
        if lanes[b, j] >= 0:
            assert torch.equal(out[b, j], source[b, lanes[b, j]]), (b, j)
        else:
            assert torch.isnan(out[b, j].float()).all(), (b, j)
# delta fetch through a hot cache: -1 reads the slot, a host read also fills its slot (scratch = last)
source = torch.randn(2, 30, 3, 2, 2, 8).to(torch.bfloat16)
hot = torch.randn(2, 5, 3, 2, 2, 8).to(torch.bfloat16)
host_rows = torch.tensor([[4, -1, 17, 29, -1], [-1, -1, 0, 8, 3]])
hot_slots = torch.tensor([[0, 2, 4, 1, 3], [1, 0, 4, 4, 2]])
expected_hot = hot.clone()
expected = torch.empty(2, 5, 3, 2, 2, 8, dtype=torch.bfloat16)
for b in range(2):
    for j in range(5):
        if host_rows[b, j] >= 0:
            expected[b, j] = source[b, host_rows[b, j]]
            expected_hot[b, hot_slots[b, j]] = source[b, host_rows[b, j]]
        else:
            expected[b, j] = hot[b, hot_slots[b, j]]
out = torch.full_like(expected, float("nan"))
gather_rows(source, host_rows, out, num_programs=3, hot=hot, hot_slots=hot_slots)
assert torch.equal(out, expected)
assert torch.equal(hot[:, :4], expected_hot[:, :4])  # the scratch slot (4) may hold anything
# the side-stream write-back: keys/values of any strides into one layer slot of a token-major arena
from omnikv_runtime.transfer.triton_gather import scatter_rows

arena = torch.full((2, 12, 3, 2, 2, 8), float("nan"))
keys = torch.randn(2, 5, 2, 8).transpose(1, 2)  # [batch, heads, n, dim], not contiguous
values = torch.randn(2, 2, 5, 8)
scatter_rows(arena, 1, 4, keys, values)
assert torch.equal(arena[:, 4:9, 1, 0], keys.transpose(1, 2))
assert torch.equal(arena[:, 4:9, 1, 1], values.transpose(1, 2))
assert torch.isnan(arena[:, :4]).all() and torch.isnan(arena[:, 9:]).all()
assert torch.isnan(arena[:, 4:9, [0, 2]]).all()
# one layer's slice of the packed rows, as the engine gathers per layer: source arena[:, :, j] (token stride =
# every layer's row), output staging[:, :, j] of a packed staging buffer; the other layers stay poisoned
arena = torch.randn(2, 30, 3, 2, 2, 8).to(torch.bfloat16)
indices = torch.stack([torch.randperm(30)[:6] for _ in range(2)])
staging = torch.full((2, 6, 3, 2, 2, 8), float("nan"), dtype=torch.bfloat16)
gather_rows(arena[:, :, 1], indices, staging[:, :, 1], num_programs=3)
rows = arena[torch.arange(2)[:, None], indices]  # [batch, k, layers, 2, heads, dim]
assert torch.equal(staging[:, :, 1], rows[:, :, 1])
assert torch.isnan(staging[:, :, [0, 2]].float()).all()
# every layer in turn, through a hot cache's layer slices (the engine's loop): the same rows, the same hot slots
staging = torch.full((2, 5, 3, 2, 2, 8), float("nan"), dtype=torch.bfloat16)
hot_layers = hot.clone()
for j in range(3):
    layer_hot = hot_layers[:, :, j]
    gather_rows(source[:, :, j], host_rows, staging[:, :, j], num_programs=2, hot=layer_hot, hot_slots=hot_slots)
assert torch.equal(staging, expected)
assert torch.equal(hot_layers[:, :4], expected_hot[:, :4])
# decode write-back: target[b, target_index] = source[b, source_index], indices int64 [1] tensors; nothing else written
from omnikv_runtime.transfer.triton_gather import copy_row

ring = torch.randn(2, 4, 3, 2, 2, 8)
target = torch.full((2, 12, 3, 2, 2, 8), float("nan"))
copy_row(target, torch.tensor([9]), ring, torch.tensor([2]))
assert torch.equal(target[:, 9], ring[:, 2])
assert torch.isnan(target[:, :9]).all() and torch.isnan(target[:, 10:]).all()
copy_row(target, torch.tensor([0]), ring, torch.tensor([3]))
assert torch.equal(target[:, 0], ring[:, 3]) and torch.equal(target[:, 9], ring[:, 2])
assert torch.isnan(target[:, 1:9]).all() and torch.isnan(target[:, 10:]).all()
# per-row indices (a server's rows at their own positions): target[b, target_index[b]] = source[b, source_index[b]]
per_row = torch.full((2, 12, 3, 2, 2, 8), float("nan"))
copy_row(per_row, torch.tensor([3, 7]), ring, torch.tensor([1, 0]))
assert torch.equal(per_row[0, 3], ring[0, 1]) and torch.equal(per_row[1, 7], ring[1, 0])
assert torch.isnan(per_row[0, [c for c in range(12) if c != 3]]).all()
assert torch.isnan(per_row[1, [c for c in range(12) if c != 7]]).all()
long_ring = torch.randn(3, 2, 5000).to(torch.bfloat16)  # a row longer than one block
long_target = torch.full((3, 7, 5000), float("nan"), dtype=torch.bfloat16)
copy_row(long_target, torch.tensor([6]), long_ring, torch.tensor([1]))
assert torch.equal(long_target[:, 6], long_ring[:, 1]) and torch.isnan(long_target[:, :6].float()).all()
try:
    copy_row(torch.empty(2, 5, 4), torch.tensor([0]), torch.randn(2, 3, 5), torch.tensor([0]))
except ValueError as exc:
    assert "do not fit" in str(exc)
else:
    raise AssertionError("a mismatched copy_row target was accepted")
empty = torch.full((2, 0, 3), 7.0)
gather_rows(torch.randn(2, 5, 3), torch.empty(2, 0, dtype=torch.long), empty)
try:
    gather_rows(torch.randn(1, 5, 3), torch.zeros(1, 2, dtype=torch.long), torch.empty(1, 2, 4))
except ValueError as exc:
    assert "does not fit" in str(exc)
else:
    raise AssertionError("a mismatched output was accepted")
print("ok")
"""


def test_triton_gather_kernel_in_the_interpreter():
    run_in_triton_interpreter(CHECK)

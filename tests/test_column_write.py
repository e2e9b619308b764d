"""The decode step's cache write (``omnikv_runtime.kernels.column_write``) on CPU.

- Under Triton's interpreter, one launch writes a dense layer's keys and values (column dimension 2) and a
  sparse layer's tail ring slices (column dimension 1, non-contiguous views of one buffer) exactly as torch's
  ``scatter_`` does, each row at its own column; one column for every row; a column outside the buffer writes
  nothing; every other element keeps its poison.
- Without Triton's kernel (plain CPU) the same calls fall back to ``scatter_`` with the same result.
"""

from __future__ import annotations

import torch
from okv_testlib import run_in_triton_interpreter

from omnikv_runtime.kernels.column_write import write_columns

INTERPRETED = """
import torch
from omnikv_runtime.kernels import column_write
from omnikv_runtime.kernels.column_write import write_columns

assert column_write._fits_the_kernel  # the kernel path is the one taken below
torch.manual_seed(0)

def scattered(buffer, dim, columns, values):
    expected = buffer.clone()
    shape = [1] * values.dim()
    shape[0] = columns.numel()
    expected.scatter_(dim, columns.view(shape).expand_as(values), values)
    return expected

# a dense layer: [batch, kv_heads, capacity, head_dim], one token a row at its own position
keys, values = torch.full((3, 4, 50, 24), 7.0), torch.full((3, 4, 50, 24), -7.0)  # poison
new_keys, new_values = torch.randn(3, 4, 1, 24), torch.randn(3, 4, 1, 24)
position = torch.tensor([0, 17, 49])
expected = scattered(keys, 2, position, new_keys), scattered(values, 2, position, new_values)
assert column_write._fits_the_kernel(2, position, ((keys, new_keys), (values, new_values)))
write_columns(2, position, (keys, new_keys), (values, new_values))
assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1])

# one column for every row, one pair
keys_once = torch.full((3, 4, 50, 24), 7.0)
write_columns(2, torch.tensor([5]), (keys_once, new_keys))
assert torch.equal(keys_once, scattered(torch.full((3, 4, 50, 24), 7.0), 2, torch.tensor([5, 5, 5]), new_keys))

# a tail ring: [rows, tokens, layers, 2, kv_heads, dim]; a layer's keys and values are strided views
ring = torch.full((2, 6, 3, 2, 4, 24), 3.0)
tokens = torch.randn(2, 4, 1, 24), torch.randn(2, 4, 1, 24)
slot = torch.tensor([5, 2])
pairs = [(ring[:, :, 1, 0], tokens[0].transpose(1, 2)), (ring[:, :, 1, 1], tokens[1].transpose(1, 2))]
expected_ring = ring.clone()
for buffer, new in [(expected_ring[:, :, 1, 0], pairs[0][1]), (expected_ring[:, :, 1, 1], pairs[1][1])]:
    buffer.copy_(scattered(buffer, 1, slot, new))
assert column_write._fits_the_kernel(1, slot, tuple(pairs))
write_columns(1, slot, *pairs)
assert torch.equal(ring, expected_ring)

# a column outside the buffer writes nothing (the other rows are written)
outside = torch.full((3, 4, 50, 24), 7.0)
write_columns(2, torch.tensor([50, -1, 3]), (outside, new_keys))
assert torch.equal(outside[:2], torch.full((2, 4, 50, 24), 7.0))
assert torch.equal(outside[2:], scattered(torch.full((1, 4, 50, 24), 7.0), 2, torch.tensor([3]), new_keys[2:]))
print("ok")
"""


def test_one_launch_writes_keys_and_values_as_scatter_does_under_the_interpreter():
    run_in_triton_interpreter(INTERPRETED)


def test_without_the_kernel_each_pair_is_a_scatter():
    generator = torch.Generator().manual_seed(1)
    keys, values = torch.full((2, 4, 9, 8), 7.0), torch.full((2, 4, 9, 8), -7.0)
    new_keys, new_values = torch.randn(2, 4, 1, 8, generator=generator), torch.randn(2, 4, 1, 8, generator=generator)
    write_columns(2, torch.tensor([8, 0]), (keys, new_keys), (values, new_values))
    assert torch.equal(keys[0, :, 8], new_keys[0, :, 0]) and torch.equal(keys[1, :, 0], new_keys[1, :, 0])
    assert torch.equal(values[0, :, 8], new_values[0, :, 0]) and torch.equal(values[1, :, 0], new_values[1, :, 0])
    keys[0, :, 8], keys[1, :, 0] = 7.0, 7.0
    assert torch.equal(keys, torch.full((2, 4, 9, 8), 7.0))  # nothing else was written

"""The Triton gather kernel under TRITON_INTERPRET=1, on CPU tensors (the GPU run is in test_gpu.py).

The interpreter must be chosen before triton is imported, so the checks run in a child process.
"""

from __future__ import annotations

import os
import subprocess
import sys

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
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    isolated = ["-P"] if sys.version_info >= (3, 11) else []  # import the installed package, not the cwd
    command = [sys.executable, *isolated, "-c", CHECK]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")

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

"""The grouped decode projections (``omnikv_runtime.kernels.decode_linear``) on CPU, under Triton's interpreter.

- One launch of one to three weights (different widths, partial feature tiles, a reduction that is not a whole
  number of steps) equals torch's linear of each weight in float32 within rounding.
- A row's product has the same bits alone and among 2 to 20, 64 or 100 rows (other rows of other sizes).
- The gated launch equals ``silu(x @ gate.T) * (x @ up.T)``.
- With a residual, one weight's launch returns exactly ``residual + x @ w.T`` as torch adds it to the product.
- Wrong groups are refused with the shapes named.
The GPU test (bf16, Llama-3-8B's shapes, inside the engine's recorded step) is ``test_gpu_decode_linear.py``.
"""

from __future__ import annotations

import pytest
import torch
from okv_testlib import run_in_triton_interpreter

from omnikv_runtime.kernels import decode_linear

INTERPRETED = """
import torch
from omnikv_runtime.kernels.decode_linear import gated_linear, grouped_linear

torch.manual_seed(0)
reduction = 300  # not a whole number of BLOCK_K steps
weights = [torch.randn(n, reduction) * 0.05 for n in (70, 33, 17)]  # partial tiles of each weight
x = torch.randn(100, reduction)
x[20:] = torch.randn(80, reduction) * 100  # other rows of other sizes: they must not move row 0
for shape in ({"BLOCK_N": 16, "BLOCK_K": 128}, {"BLOCK_N": 32, "BLOCK_K": 64}):
    for group in (weights[:1], weights[:2], weights):
        alone = grouped_linear(x[:1], group, shape)
        for rows in (*range(2, 21), 64, 100):
            together = grouped_linear(x[:rows], group, shape)
            assert all(torch.equal(t[0], a[0]) for t, a in zip(together, alone)), rows
        for out, weight in zip(together, group):
            torch.testing.assert_close(out[:20], x[:20] @ weight.T, rtol=1e-4, atol=1e-4)
    three = grouped_linear(x[:6].reshape(2, 3, reduction), weights, shape)
    assert [tuple(t.shape) for t in three] == [(2, 3, 70), (2, 3, 33), (2, 3, 17)]
    gate, up = weights[1], torch.randn(33, reduction) * 0.05
    gated = gated_linear(x[:20], gate, up, shape)
    reference = torch.nn.functional.silu(x[:20] @ gate.T) * (x[:20] @ up.T)
    torch.testing.assert_close(gated, reference, rtol=1e-4, atol=1e-4)
    assert torch.equal(gated_linear(x[:1], gate, up, shape)[0], gated[0])
    residual = torch.randn(100, 70)
    (plain,) = grouped_linear(x, weights[:1], shape)
    (added,) = grouped_linear(x, weights[:1], shape, residual=residual)
    assert torch.equal(added, residual + plain)  # the product, then the sum: torch's two roundings
    (alone,) = grouped_linear(x[:1], weights[:1], shape, residual=residual[:1])
    assert torch.equal(alone[0], added[0])
    odd = torch.randn(70, 100).T  # a residual that is not row-major is read as its values
    assert torch.equal(grouped_linear(x, weights[:1], shape, residual=odd)[0], odd + plain)
print("ok")
"""


def test_grouped_products_equal_torch_and_keep_a_rows_bits_under_the_interpreter():
    run_in_triton_interpreter(INTERPRETED)


@pytest.mark.skipif(not decode_linear.TRITON_AVAILABLE, reason="needs Triton")
def test_wrong_groups_are_refused_with_the_shapes_named():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="one to three weights"):
        decode_linear.grouped_linear(x, [torch.randn(4, 8)] * 4)
    with pytest.raises(ValueError, match=r"shape \(4, 9\) for an input of 8"):
        decode_linear.grouped_linear(x, [torch.randn(4, 9)])
    with pytest.raises(ValueError, match="not to a group of 2"):
        decode_linear.grouped_linear(x, [torch.randn(4, 8)] * 2, residual=torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"residual of shape \(2, 5\).*output of \(2, 4\)"):
        decode_linear.grouped_linear(x, [torch.randn(4, 8)], residual=torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"residual of shape \(2, 4\) \(torch.float16"):
        decode_linear.grouped_linear(x, [torch.randn(4, 8)], residual=torch.randn(2, 4).half())
    with pytest.raises(ValueError, match=r"gate \(4, 8\) and up \(5, 8\)"):
        decode_linear.gated_linear(x, torch.randn(4, 8), torch.randn(5, 8))

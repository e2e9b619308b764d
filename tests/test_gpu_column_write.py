"""GPU check of the decode step's cache write (``pytest -m gpu`` on a CUDA machine).

bf16 at Llama-3-8B's KV geometry: one launch writes a dense layer's keys and values at each row's position of a
128K-column buffer, and a sparse layer's tail-ring slices, exactly as torch's ``scatter_`` writes them; every
other element keeps its poison; inside a CUDA graph, replays write at the columns the device holds at replay.
"""

from __future__ import annotations

import pytest
import torch

from omnikv_runtime.kernels.column_write import _fits_the_kernel, write_columns

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _scattered(buffer, dim, columns, values):
    expected = buffer.clone()
    shape = [1] * values.dim()
    shape[0] = columns.numel()
    expected.scatter_(dim, columns.view(shape).expand_as(values), values)
    return expected


def test_bf16_writes_equal_scatter_and_replay_in_a_graph():
    generator = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=generator)

    keys = torch.full((4, 8, 131072, 128), 7.0, device="cuda", dtype=torch.bfloat16)
    values = torch.full_like(keys, -7.0)
    new_keys, new_values = rand(4, 8, 1, 128), rand(4, 8, 1, 128)
    position = torch.tensor([0, 65_000, 131_071, 12], device="cuda")
    expected = _scattered(keys, 2, position, new_keys), _scattered(values, 2, position, new_values)
    assert _fits_the_kernel(2, position, ((keys, new_keys), (values, new_values)))
    write_columns(2, position, (keys, new_keys), (values, new_values))
    assert torch.equal(keys, expected[0]) and torch.equal(values, expected[1])

    ring = torch.full((4, 64, 24, 2, 8, 128), 3.0, device="cuda", dtype=torch.bfloat16)
    slot = torch.tensor([0, 5, 63, 5], device="cuda")
    pairs = ((ring[:, :, 9, 0], new_keys.transpose(1, 2)), (ring[:, :, 9, 1], new_values.transpose(1, 2)))
    expected_ring = ring.clone()
    expected_ring[:, :, 9, 0] = _scattered(ring[:, :, 9, 0], 1, slot, pairs[0][1])
    expected_ring[:, :, 9, 1] = _scattered(ring[:, :, 9, 1], 1, slot, pairs[1][1])
    write_columns(1, slot, *pairs)
    assert torch.equal(ring, expected_ring)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        write_columns(1, slot, *pairs)  # compiled before the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            write_columns(1, slot, *pairs)
    torch.cuda.current_stream().wait_stream(stream)
    slot.copy_(torch.tensor([1, 2, 3, 4], device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    for row, column in enumerate([1, 2, 3, 4]):
        assert torch.equal(ring[row, column, 9, 0], new_keys[row, :, 0])
        assert torch.equal(ring[row, column, 9, 1], new_values[row, :, 0])

"""Filling a runtime cache with prompt KV without running the model (a 128K-token prefill costs minutes).

The benchmarks that time decode steps at long contexts write random KV straight into the tiers,
chunk by chunk in a prefill's order: each chunk begins as a prefill forward would
(``cache.begin_forward``), then every layer's KV is appended (dense layers' buffers, sparse
layers' host arenas), nothing read back. Decoding then starts as after a real prefill.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def fill_prompt(
    cache, tokens: int, chunk: int, layer_kv: Callable[[int, int, int], tuple[torch.Tensor, torch.Tensor]]
) -> None:
    """Append ``tokens`` prompt tokens to every layer of ``cache`` in chunks of ``chunk``;
    ``layer_kv(layer, start, count)`` gives a layer's keys and values ``[batch, kv_heads, count, head_dim]``."""
    chunk = min(chunk or tokens, tokens)
    for start in range(0, tokens, chunk):
        count = min(chunk, tokens - start)
        for layer in range(len(cache.layers)):
            keys, values = layer_kv(layer, start, count)
            if layer == 0:
                cache.begin_forward(keys)
            cache.tiers.append(layer, keys, values)

"""Several requests' prefill chunks in one forward: transformers' ``Cache`` over their batch-1 caches.

The server prefills each request through a batch-1 :class:`~omnikv_runtime.cache.adapter.OmniKVCache`
over its slot (:meth:`~omnikv_runtime.cache.slots.SlotCache.row_cache`). When a turn runs chunks of
several requests, they are packed as one sequence ``[1, sum of the chunks' tokens]``, each token with
its own position id (the rotary embedding reads those), and run through a :class:`PackedPrefill`:

- ``update(k, v, layer_idx)`` splits the packed KV by request (:class:`PackedSpan`) and appends each
  part through that request's own cache, exactly as its chunk alone would be appended (dense layers'
  buffers, sparse layers' host-arena rows of its slot);
- it leaves a note for the ``"omnikv"`` attention function, which then attends each request's queries
  to that request's KV alone, causally, as the request's own prefill would
  (:mod:`~omnikv_runtime.cache.attention`), and keeps each filter layer's queries in that request's
  query window.

The forward is given a 4-D mask of one element, so transformers builds none (it would span the whole
packed sequence); the attention function ignores it for packed layers. Packed or not, each request's
KV, query windows and policy state come out as its solo prefill leaves them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache

from omnikv_runtime.cache.adapter import OmniKVCache, leave_note
from omnikv_runtime.cache.prefill_blocks import EarlierKV
from omnikv_runtime.listeners import Listeners


@dataclass
class PackedSpan:
    """One request's part of the packed chunk at one layer."""

    cache: OmniKVCache  # the request's batch-1 cache
    start: int  # its first token in the packed sequence
    stop: int  # one past its last token
    keys: torch.Tensor | None = None  # what its cache's update returned: the request's KV so far, or for a
    values: torch.Tensor | None = None  # sparse layer its chunk alone, the rest described by ``earlier``
    earlier: EarlierKV | None = None


class PackedPrefill(Cache):
    """The caches of several requests, each with its chunk's token count, in packing order.

    Args:
        parts: ``(batch-1 cache, tokens of its chunk)`` per request; the packed sequence is their chunks
            in this order.
        fused_layers: decoder layers given the fused forward run it for this cache.
        listeners: the engine's observers (the forward's end is announced to them).
    """

    def __init__(
        self, parts: list[tuple[OmniKVCache, int]], fused_layers: bool = False, listeners: Listeners | None = None
    ) -> None:
        if not parts or any(tokens < 1 for _, tokens in parts):
            raise ValueError(f"a packed prefill needs chunks of at least one token, got {[t for _, t in parts]}")
        super().__init__(layers=parts[0][0].layers)
        self.fused_layers = fused_layers
        self.listeners = listeners if listeners is not None else Listeners()
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for _, tokens in parts:
            self.bounds.append((start, start + tokens))
            start += tokens
        self.tokens = start
        self.caches = [cache for cache, _ in parts]
        self.pending: int | None = None  # the layer whose spans wait for the attention function
        self._spans: list[PackedSpan] = []

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if key_states.shape[0] != 1 or key_states.shape[2] != self.tokens:
            raise ValueError(
                f"a packed prefill runs one sequence of {self.tokens} tokens, got KV of shape {tuple(key_states.shape)}"
            )
        self.check_attended()
        spans = []
        for cache, (start, stop) in zip(self.caches, self.bounds, strict=True):
            keys, values = cache.update(key_states[:, :, start:stop], value_states[:, :, start:stop], layer_idx)
            spans.append(PackedSpan(cache, start, stop, keys, values, cache.tiers.layers[layer_idx].earlier))
        if layer_idx == 0:  # each cache's first update dropped the reads the caches before it started ahead
            for cache in self.caches[:-1]:
                cache.tiers.prefetch_after(-1)
        self._spans, self.pending = spans, layer_idx
        leave_note(self, layer_idx, key_states, None)
        return key_states, value_states

    def take_spans(self, layer_idx: int) -> list[PackedSpan]:
        """The attention function's side: each request's part of layer ``layer_idx`` (once)."""
        if self.pending != layer_idx:
            raise RuntimeError(f"layer {layer_idx} attends, but the packed prefill last stored layer {self.pending}")
        spans, self._spans, self.pending = self._spans, [], None
        return spans

    def check_attended(self) -> None:
        """Raise if the last layer stored was never attended through the ``"omnikv"`` attention function (its
        requests' attention would have been computed over the wrong keys)."""
        if self.pending is not None:
            raise RuntimeError(
                f"layer {self.pending}'s packed prefill chunk was not attended by the omnikv attention function: "
                "the model's attention implementation is not the runtime's"
            )

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """The longest request's tokens so far (transformers asks; each request keeps its own)."""
        return max(cache.get_seq_length(layer_idx) for cache in self.caches)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a packed prefill's requests are separate: beam search does not apply")

    batch_select_indices = reorder_cache

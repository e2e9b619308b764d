"""The tiered KV cache: the parts a decode step runs through, and transformers' ``Cache`` over them.

- :mod:`~omnikv_runtime.cache.layers`: per-layer KV storage (dense layers on the GPU, sparse
  layers in their segment's host arena), transformers ``CacheLayerMixin`` objects;
- :mod:`~omnikv_runtime.cache.segment`: one segment's buffers (arena, tail ring, selection,
  staging, hot cache, query window);
- :mod:`~omnikv_runtime.cache.counters`: where a decode step is, on the device;
- :mod:`~omnikv_runtime.cache.adapter`: ``OmniKVCache``, the ``Cache`` a model's attention talks to;
- :mod:`~omnikv_runtime.cache.attention`: the ``"omnikv"`` attention function that reads it;
- :mod:`~omnikv_runtime.cache.slots`: the server's cache, whose rows are independent requests;
- :mod:`~omnikv_runtime.cache.packed`: several requests' prefill chunks in one forward, each through its
  own batch-1 cache.
"""

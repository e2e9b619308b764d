"""Decode-step kernels: attention over KV sources without copying them together, and fused
filter-layer scoring. Each has a Triton implementation for CUDA and a torch implementation of the
same function for every other device (and as the reference the tests compare against).
"""

from omnikv_runtime.kernels.decode_attention import KVSource, decode_attention, decode_attention_torch
from omnikv_runtime.kernels.head_scores import max_head_logits, max_head_logits_torch

__all__ = [
    "KVSource",
    "decode_attention",
    "decode_attention_torch",
    "max_head_logits",
    "max_head_logits_torch",
]

"""Causal LMs with random weights from a geometry alone (benchmarks and profiles of large models
on machines without their weights, e.g. Llama-3-8B geometry for the OmniKV capacity runs)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from omnikv_runtime.config import OmniKVConfig
from omnikv_runtime.planner import hf_config_dict

# The tiny Llama of the CPU test suite and of the benchmarks' CPU checks: 8 layers, 4 query heads and
# 2 KV heads of 16 dimensions; a model of it runs a decode step in about a millisecond.
TINY_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 512,
}
# A small Llama for GPU tests and benchmarks: heads of 32 dimensions (the kernels' smallest tile), 8 query
# and 2 KV heads; callers set the layers, vocabulary and positions they need.
SMALL_LLAMA: dict[str, Any] = {
    "model_type": "llama",
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "hidden_size": 256,
    "intermediate_size": 512,
}


def random_model(
    config: OmniKVConfig,
    model_config: str | Path | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    min_positions: int = 0,
) -> PreTrainedModel:
    """A model of the config's (or ``model_config``'s) geometry with seeded random weights, in eval mode,
    built directly on ``device`` in ``config.model.dtype``. Never stops early (no EOS).

    ``min_positions`` raises ``max_position_embeddings`` (random weights have no trained context
    limit; default RoPE does not depend on it), so long-context runs pass the engine's prompt check."""
    data = hf_config_dict(config, model_config)
    data["max_position_embeddings"] = max(data.get("max_position_embeddings") or 0, min_positions)
    data.update(eos_token_id=None, bos_token_id=None, pad_token_id=0)
    model_type = data.pop("model_type", "llama")
    for key in ("architectures", "transformers_version", "_name_or_path", "dtype", "torch_dtype"):
        data.pop(key, None)
    hf_config = AutoConfig.for_model(model_type, **data)
    dtype = getattr(torch, config.model.dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            hf_config, dtype=dtype, attn_implementation=config.model.attn_implementation
        )
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval()

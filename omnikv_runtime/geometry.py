"""A decoder-only model's geometry: layers, heads, KV heads, head_dim, hidden and MLP sizes, vocabulary.

The one place that reads them off a transformers config (with its fallbacks: KV heads default to the
attention heads, ``head_dim`` to hidden size / heads; a multimodal config's language model is read
from its ``text_config``); every other module asks :class:`ModelGeometry`. It imports nothing
heavy (no torch, transformers or pydantic), so the planner and the command line can use it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class ModelGeometry:
    """The geometry of a decoder-only model (Llama, Mistral, Qwen2, Qwen3): what the planner, the caches'
    buffers and the checks of a run need. Build it with :meth:`from_model` or :meth:`from_hf_config`."""

    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    tie_embeddings: bool = False
    model_type: str = "llama"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    max_positions: int | None = None

    @classmethod
    def from_model(cls, model: Any) -> ModelGeometry:
        """From a transformers model: its decoder's text config (a multimodal model's language model)."""
        return cls.from_hf_config(model.config.get_text_config(decoder=True))

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelGeometry:
        """From a transformers config object or its dict (``config.json``); a ``text_config`` inside is read instead."""
        data = config if isinstance(config, dict) else config.to_dict()
        data = data.get("text_config") or data
        heads = data["num_attention_heads"]
        model_type = data.get("model_type", "llama")
        attention_bias = bool(data.get("attention_bias", False))
        return cls(
            num_layers=data["num_hidden_layers"],
            num_heads=heads,
            kv_heads=data.get("num_key_value_heads") or heads,
            head_dim=data.get("head_dim") or data["hidden_size"] // heads,
            hidden=data["hidden_size"],
            intermediate=data["intermediate_size"],
            vocab=data["vocab_size"],
            tie_embeddings=bool(data.get("tie_word_embeddings", False)),
            model_type=model_type,
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(data.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            max_positions=data.get("max_position_embeddings"),
        )

    def layer_param_count(self) -> tuple[int, int]:
        """One decoder layer's parameters: (those tensor parallelism splits, those every rank keeps whole)."""
        h, d = self.hidden, self.head_dim
        split = h * self.num_heads * d + 2 * h * self.kv_heads * d + self.num_heads * d * h + 3 * h * self.intermediate
        split += (self.num_heads * d + 2 * self.kv_heads * d) if self.qkv_bias else 0
        split += 2 * self.intermediate if self.mlp_bias else 0
        whole = 2 * h + (h if self.o_bias else 0) + (2 * d if self.qk_norm else 0) + (h if self.mlp_bias else 0)
        return split, whole

    def param_count(self) -> int:
        """Parameters computed from the geometry (embeddings, attention, MLP, norms, head)."""
        split, whole = self.layer_param_count()
        head = 0 if self.tie_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + self.num_layers * (split + whole) + self.hidden + head

    def rank_param_count(self, tp_size: int) -> int:
        """Parameters one of ``tp_size`` ranks holds under DeepSpeed AutoTP: every layer's projections and
        the LM head (along the hidden size; a tied head becomes its own copy) split over the ranks, the
        embeddings and norms whole on every rank."""
        if tp_size == 1:
            return self.param_count()
        split, whole = self.layer_param_count()
        h = self.hidden
        return self.vocab * h + self.vocab * h // tp_size + self.num_layers * (split // tp_size + whole) + h

    def zero_inference_gpu_params(self) -> int:
        """Parameters on the GPU at a time under ZeRO-Inference: the largest module group fetched (one decoder
        layer, or the embeddings or LM head), the prefetch bucket (two ``hidden x hidden`` matrices) and the
        norms kept resident (at most ``hidden`` elements each)."""
        split, whole = self.layer_param_count()
        h = self.hidden
        return max(split + whole, self.vocab * h) + 2 * h * h + (2 * self.num_layers + 1) * h

    def shard(self, tp_size: int) -> ModelGeometry:
        """The geometry one of ``tp_size`` ranks computes: its query heads, KV heads and MLP columns."""
        if tp_size == 1:
            return self
        return replace(
            self,
            num_heads=self.num_heads // tp_size,
            kv_heads=self.kv_heads // tp_size,
            intermediate=self.intermediate // tp_size,
        )

    def kv_row_bytes(self, dtype_bytes: int) -> int:
        """Bytes of one token of one layer, keys and values, one batch row."""
        return 2 * self.kv_heads * self.head_dim * dtype_bytes

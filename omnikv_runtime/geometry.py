"""A decoder-only model's geometry: layers, heads, KV heads, head_dim, hidden and MLP sizes, vocabulary.

The one place that reads them off a transformers config (with its fallbacks: KV heads default to the
attention heads, ``head_dim`` to hidden size / heads; a multimodal config's language model is read
from its ``text_config``); every other module asks :class:`ModelGeometry`. Known models' geometries
and the reading of a ``--model-config`` (a known name, an HF folder or a ``config.json``) live here
too. It imports nothing heavy (no torch, transformers or pydantic), so the planner and the command
line use it at once, and a mistyped ``--model-config`` is reported before torch loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omnikv_runtime.errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    from omnikv_runtime.config import OmniKVConfig


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


_LLAMA3_8B = dict(
    model_type="llama",
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    hidden_size=4096,
    intermediate_size=14336,
    vocab_size=128256,
    max_position_embeddings=8192,
)
# Llama-3.1-8B: Llama-3-8B's geometry, trained (with its RoPE scaling) to 128K positions
_LLAMA31_8B = {**_LLAMA3_8B, "max_position_embeddings": 131072}
_SMOLLM2_135M = dict(
    model_type="llama",
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    hidden_size=576,
    intermediate_size=1536,
    vocab_size=49152,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
)
KNOWN_GEOMETRIES: dict[str, dict[str, Any]] = {
    "smollm2-135m": _SMOLLM2_135M,
    "llama3-8b": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
    "meta-llama/Meta-Llama-3-8B-Instruct": _LLAMA3_8B,
    "llama3.1-8b": _LLAMA31_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA31_8B,
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
}
GEOMETRY_SOURCES = "a known model name, an HF folder with config.json, or a config.json file"


def geometry_config(source: str | Path, field: str = "--model-config") -> dict[str, Any]:
    """The HF config (as a dict) that ``source`` names: a known model, an HF folder or a ``config.json``.

    Raises ConfigError naming ``field``: "no such file" for a path that does not exist, and what is
    wrong with a file that is not a model's config.
    """
    source = str(source)
    if source in KNOWN_GEOMETRIES:
        return dict(KNOWN_GEOMETRIES[source])
    allowed = f"{GEOMETRY_SOURCES}; known models: {', '.join(sorted(KNOWN_GEOMETRIES))}"
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise ConfigError(field, source, allowed, problem="a folder without config.json")
    if not path.exists():
        bare_name = not (path.suffix or "/" in source)
        problem = "no such file"
        if bare_name:
            problem = f"no such file, folder or known model{did_you_mean(source, KNOWN_GEOMETRIES)}"
        raise ConfigError(field, source, allowed, problem=problem)
    if path.suffix != ".json":
        raise ConfigError(field, source, allowed, problem="not a .json file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        ModelGeometry.from_hf_config(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(field, str(path), f"an HF config.json with the model's geometry ({exc!r})") from None
    return data


def hf_config_dict(config: OmniKVConfig, model_config: str | Path | None = None) -> dict[str, Any]:
    """The HF config (as a dict) of ``model_config`` (a JSON file, an HF folder, or a known name), else of
    the config's model. No weights are read."""
    if model_config is not None:
        return geometry_config(model_config, "--model-config")
    return geometry_config(config.model.name_or_path, "model.name_or_path")


def resolve_geometry(config: OmniKVConfig, model_config: str | Path | None = None) -> ModelGeometry:
    """Geometry from ``model_config`` (a JSON file, an HF folder, or a known name), else the config's model."""
    return ModelGeometry.from_hf_config(hf_config_dict(config, model_config))

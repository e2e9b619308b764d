"""omnikv_runtime: OmniKV dynamic context selection with a tiered KV cache for transformers 5.x.

Quick start::

    import omnikv_runtime as okv
    model, tok = okv.load_model("smollm2-135m")
    engine = okv.initialize(model, config="configs/default.json", tokenizer=tok)
    out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=32)
"""

from __future__ import annotations

import logging

from omnikv_runtime.cache import OmniKVCache
from omnikv_runtime.config import OmniKVConfig, load_config
from omnikv_runtime.engine import SUPPORTED_MODEL_TYPES, Engine, initialize
from omnikv_runtime.errors import ConfigError, ModelLoadError, OmniKVError, PromptError, UnsupportedModelError
from omnikv_runtime.layout import LayerPlan, Role
from omnikv_runtime.profiling import MemoryProfiler, profile_memory

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"


def load_model(*args, **kwargs):
    """Load the bundled model, a local HF folder or a .gguf file; see :func:`omnikv_runtime.models.load_model`."""
    from omnikv_runtime.models import load_model as _load_model

    return _load_model(*args, **kwargs)


__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "ConfigError",
    "Engine",
    "LayerPlan",
    "MemoryProfiler",
    "ModelLoadError",
    "OmniKVCache",
    "OmniKVConfig",
    "OmniKVError",
    "PromptError",
    "Role",
    "UnsupportedModelError",
    "__version__",
    "initialize",
    "load_config",
    "load_model",
    "profile_memory",
]

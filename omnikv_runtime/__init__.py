"""omnikv_runtime: OmniKV dynamic context selection with a tiered KV cache for transformers 5.x.

Quick start::

    import omnikv_runtime as okv
    model, tok = okv.load_model("smollm2-135m")
    engine = okv.initialize(model, config="configs/default.json", tokenizer=tok)
    out = engine.generate(input_ids, attention_mask=mask, max_new_tokens=32)
    engine.detach()  # the model runs as transformers runs it again; or: with okv.attach(model, config) as engine:

The names below are imported on first use (``import omnikv_runtime`` alone loads neither torch nor
transformers), so the command line answers ``--help`` and ``--version`` at once.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from typing import TYPE_CHECKING, Any

logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"

# public name -> the module that defines it (imported when the name is first read)
_EXPORTS = {
    "attach": "omnikv_runtime.engine",
    "OmniKVCache": "omnikv_runtime.cache.adapter",
    "OmniKVConfig": "omnikv_runtime.config",
    "load_config": "omnikv_runtime.config",
    "SUPPORTED_MODEL_TYPES": "omnikv_runtime.engine",
    "Engine": "omnikv_runtime.engine",
    "initialize": "omnikv_runtime.engine",
    "ConfigError": "omnikv_runtime.errors",
    "ModelLoadError": "omnikv_runtime.errors",
    "OmniKVError": "omnikv_runtime.errors",
    "PromptError": "omnikv_runtime.errors",
    "UnsupportedModelError": "omnikv_runtime.errors",
    "LayerPlan": "omnikv_runtime.layout",
    "Role": "omnikv_runtime.layout",
    "MemoryProfiler": "omnikv_runtime.profiling",
    "profile_memory": "omnikv_runtime.profiling",
}

if TYPE_CHECKING:  # what type checkers and editors see; at run time __getattr__ imports on demand
    from omnikv_runtime.cache.adapter import OmniKVCache
    from omnikv_runtime.config import OmniKVConfig, load_config
    from omnikv_runtime.engine import SUPPORTED_MODEL_TYPES, Engine, attach, initialize
    from omnikv_runtime.errors import ConfigError, ModelLoadError, OmniKVError, PromptError, UnsupportedModelError
    from omnikv_runtime.layout import LayerPlan, Role
    from omnikv_runtime.profiling import MemoryProfiler, profile_memory


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule, ``okv.launcher``) the first time it is read."""
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


def load_model(*args: Any, **kwargs: Any) -> Any:
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
    "attach",
    "initialize",
    "load_config",
    "load_model",
    "profile_memory",
]

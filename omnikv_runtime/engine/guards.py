"""What keeps an engine correct when it is used in ways it does not drive itself.

* :class:`ExclusiveUse`: one engine, several threads. An engine keeps decode loops (caches,
  buffers, a captured CUDA graph) for reuse by later calls, so two of its ``generate`` calls must
  not run at once; the second waits for the first (calls are serialised, never interleaved).
  Per-request state (a policy's running scores, the hot cache's bookkeeping) lives in each cache,
  so caches from ``engine.new_cache()`` may serve requests on several threads.
* :func:`check_supported`: the model families (and attention layouts) the runtime runs.
* :func:`mark_prefill_forwards`: a cache handed to ``model.generate`` must tell the forwards of a
  chunked prefill from decode steps, even when the prompt's last chunk is a single token.
  transformers prepares every prefill forward with ``is_first_iteration=True``; the hook reads
  that and tells the cache how long the prompt is, so no ``prompt_tokens`` argument is needed.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch
from transformers import PreTrainedModel

from omnikv_runtime.cache.adapter import OmniKVCache
from omnikv_runtime.errors import OmniKVError, UnsupportedModelError

_MARKER = "_omnikv_prefill_marker"

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def check_supported(model: PreTrainedModel) -> None:
    """Raise UnsupportedModelError unless `model` is a decoder-only LM of a family we support."""
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(
            f"expected a transformers model (AutoModelForCausalLM.from_pretrained(...)), got {type(model).__name__}; "
            "to load one by name or path, pass it as initialize(model='smollm2-135m') or in the config's model section"
        )
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model type '{model_type}' ({type(model).__name__}) is not supported: omnikv_runtime runs "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} decoder-only models (attention through transformers' "
            "AttentionInterface and a Cache). Load one of those, or run this model without the runtime."
        )
    if not hasattr(model, "generate"):
        raise UnsupportedModelError(f"{type(model).__name__} has no generate(); load it with AutoModelForCausalLM")
    text_config = model.config.get_text_config(decoder=True)
    layer_types = getattr(text_config, "layer_types", None) or []
    sliding = "sliding_attention" in layer_types or (model_type == "mistral" and text_config.sliding_window)
    if sliding:
        raise UnsupportedModelError(
            f"{type(model).__name__} uses sliding-window attention, which omnikv_runtime does not run (its "
            "decode step attends to the whole context). Set config.sliding_window = None (exact while the "
            "context fits the window), or run this model without the runtime."
        )


class EngineBusyError(OmniKVError, RuntimeError):
    """An engine was asked to generate again from inside one of its own ``generate`` calls."""


class ExclusiveUse:
    """A lock that serialises an engine's ``generate`` calls across threads and refuses re-entry."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    @property
    def busy(self) -> bool:
        return self._lock.locked()

    @contextlib.contextmanager
    def hold(self, what: str = "Engine.generate") -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:
            raise EngineBusyError(
                f"{what} was called from inside a running generate of the same engine (a streamer, stopping "
                "criterion or logits processor that generates?): an engine runs one request at a time; "
                "build a second engine with okv.initialize(model, config) for the nested call"
            )
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None


def _prefill_tokens(inputs: dict[str, Any]) -> int | None:
    """Tokens the prepared forward adds (input_ids or inputs_embeds along the sequence), if known."""
    for key in ("input_ids", "inputs_embeds"):
        value = inputs.get(key)
        if torch.is_tensor(value) and value.dim() >= 2:
            return int(value.shape[1])
    return None


def mark_prefill_forwards(model: Any) -> None:
    """Make ``model.generate`` tell an :class:`OmniKVCache` how long the prompt being prefilled is.

    Wraps the model's ``prepare_inputs_for_generation`` (once per model): a forward prepared with
    ``is_first_iteration=True`` is a prefill forward (the whole prompt, or one of its chunks), and
    the cache's ``prompt_tokens`` becomes at least the length the cache will have after it. Other
    caches and models without that method are left alone.
    """
    if not hasattr(type(model), "prepare_inputs_for_generation") or getattr(model, _MARKER, False):
        return
    # a method bound to the model (not a closure over it): a deep copy of the model gets its own
    model.prepare_inputs_for_generation = types.MethodType(_marking_prepare_inputs, model)
    setattr(model, _MARKER, True)


def unmark_prefill_forwards(model: Any) -> None:
    """Undo :func:`mark_prefill_forwards`: the model's own ``prepare_inputs_for_generation`` again."""
    if getattr(model, _MARKER, False):
        del model.prepare_inputs_for_generation  # the instance attribute: the class's method shows again
        delattr(model, _MARKER)


def _marking_prepare_inputs(self: Any, *args: Any, **kwargs: Any) -> Any:
    inputs = type(self).prepare_inputs_for_generation(self, *args, **kwargs)
    if kwargs.get("is_first_iteration") and isinstance(inputs, dict):
        cache = inputs.get("cache", inputs.get("past_key_values"))
        added = _prefill_tokens(inputs)
        if isinstance(cache, OmniKVCache) and added is not None:
            cache.expect_prompt(cache.get_seq_length() + added)
    return inputs

"""What the runtime changes on a model, and how it gives the model back.

An :class:`~omnikv_runtime.engine.Engine` registers OmniKV's attention function and sets it as the
model's attention implementation, gives Llama decoder layers the fused forward (where
``generation.fused_layers`` asks for it), and hooks the model's input preparation so that
``model.generate`` with the runtime's cache tells prefill from decode. :func:`detach_model` (what
``engine.detach()`` runs) undoes all three, and :func:`attach` scopes an engine to a block, as
kvpress's ``with press(model):`` does::

    with okv.attach(model, "configs/default.json", tokenizer=tok) as engine:
        engine.generate(ids, max_new_tokens=32)
    # the model runs as transformers runs it again
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from transformers import PreTrainedModel

from omnikv_runtime.cache.attention import base_implementation, register_attention
from omnikv_runtime.config import OmniKVConfig
from omnikv_runtime.engine.fused_layers import install_fused_layers, remove_fused_layers
from omnikv_runtime.engine.guards import mark_prefill_forwards, unmark_prefill_forwards
from omnikv_runtime.errors import ConfigError
from omnikv_runtime.kernels.triton_support import TRITON_AVAILABLE
from omnikv_runtime.listeners import Listeners

logger = logging.getLogger(__name__)


def base_attention(model: PreTrainedModel, config: OmniKVConfig) -> str:
    """The model's own attention implementation (unwrapping an earlier ``omnikv``), else the config's."""
    current = base_implementation(getattr(model.config, "_attn_implementation", None))
    if current is None:
        return config.model.attn_implementation
    asked = config.model.attn_implementation
    if "attn_implementation" in config.model.model_fields_set and asked != current:
        logger.warning(
            "the model was loaded with attn_implementation=%r; the config's %r is ignored "
            "(a model handed to initialize wins; load it with the implementation you want)",
            current,
            asked,
        )
    return current


def _fuse_layers(
    model: PreTrainedModel,
    device: torch.device,
    wanted: bool | str,
    weights_offloaded: bool,
    batch_invariant: bool = False,
) -> bool:
    """Install the fused decoder-layer forward where ``generation.fused_layers`` asks for it (``batch_invariant``:
    with the batch-invariant projections, which run only inside fused layers)."""
    fused = _install_fused_layers(model, device, wanted, weights_offloaded, batch_invariant)
    if batch_invariant and not fused:
        raise ConfigError(
            "generation.batch_invariant",
            True,
            'false, unless the decoder layers are fused (generation.fused_layers true or "auto" on CUDA, a Llama '
            "architecture; the batch-invariant projections run inside the fused layers)",
        )
    return fused


def _install_fused_layers(
    model: PreTrainedModel, device: torch.device, wanted: bool | str, weights_offloaded: bool, batch_invariant: bool
) -> bool:
    if weights_offloaded:  # the fused forward reads norm weights itself; ZeRO-3 fetches them only in the norm's call
        if wanted is True:
            raise ConfigError(
                "generation.fused_layers",
                True,
                'false or "auto" with distributed.offload_weights (transformers\' layers let DeepSpeed fetch '
                "each submodule's weights)",
            )
        return False
    if wanted is False or (wanted == "auto" and not (device.type == "cuda" and TRITON_AVAILABLE)):
        return False
    fused = install_fused_layers(model, batch_invariant)
    if fused == 0:
        logger.log(
            logging.WARNING if wanted is True else logging.INFO,
            "generation.fused_layers: no decoder layer of %s can be fused; transformers' layers run",
            type(model).__name__,
        )
    return fused > 0


def attach_model(
    model: PreTrainedModel, config: OmniKVConfig, device: torch.device, listeners: Listeners
) -> tuple[str, bool]:
    """Give `model` OmniKV's attention, fused layers (if asked for), prefill marks and the forward
    events of ``listeners``; returns the base attention implementation (what :func:`detach_model`
    restores) and whether layers were fused."""
    base = base_attention(model, config)
    model.set_attn_implementation(register_attention(base))
    generation = config.generation
    try:
        fused = _fuse_layers(
            model, device, generation.fused_layers, config.distributed.offload_weights, generation.batch_invariant
        )
    except ConfigError:
        detach_model(model, base)  # the model as it came
        raise
    mark_prefill_forwards(model)  # model.generate with a cache from new_cache() tells prefill from decode
    _announce_forwards(model, listeners)
    return base, fused


def detach_model(model: PreTrainedModel, base: str) -> None:
    """Undo :func:`attach_model`: attention implementation `base`, the layers' own forward, the model's
    own input preparation, no forward events."""
    model.set_attn_implementation(base)
    remove_fused_layers(model)
    unmark_prefill_forwards(model)
    for handle in model.__dict__.pop(_FORWARD_HOOKS, ()):
        handle.remove()


_FORWARD_HOOKS = "_omnikv_forward_hooks"
_CACHE_KEYWORDS = ("cache", "past_key_values")


def _announce_forwards(model: PreTrainedModel, listeners: Listeners) -> None:
    """Send a :class:`~omnikv_runtime.listeners.ForwardEnd` to ``listeners`` when a forward of ``model``
    returns (with the engine's cache it ran through, or None). Nothing is timed or sent while no one
    listens or a step is being recorded."""
    for handle in model.__dict__.pop(_FORWARD_HOOKS, ()):
        handle.remove()
    starts: list[float | None] = []

    def before(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        starts.append(time.perf_counter() if listeners.active else None)

    def after(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        start = starts.pop() if starts else None
        if start is None or not listeners.active:
            return
        cache = next((kwargs[k] for k in _CACHE_KEYWORDS if kwargs.get(k) is not None), None)
        if getattr(cache, "listeners", None) is not listeners:
            cache = None  # not one of this engine's caches
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        tokens = int(ids.shape[1]) if torch.is_tensor(ids) and ids.dim() >= 2 else 0
        listeners.announce_forward_end(cache, tokens, start)

    handles = [
        model.register_forward_pre_hook(before, with_kwargs=True),
        model.register_forward_hook(after, with_kwargs=True),
    ]
    setattr(model, _FORWARD_HOOKS, handles)

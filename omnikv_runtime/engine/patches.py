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

import torch
from transformers import PreTrainedModel

from omnikv_runtime.cache.attention import base_implementation, register_attention
from omnikv_runtime.config import OmniKVConfig
from omnikv_runtime.engine.fused_layers import install_fused_layers, remove_fused_layers
from omnikv_runtime.engine.guards import mark_prefill_forwards, unmark_prefill_forwards
from omnikv_runtime.errors import ConfigError
from omnikv_runtime.kernels.triton_support import TRITON_AVAILABLE

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


def _fuse_layers(model: PreTrainedModel, device: torch.device, wanted: bool | str, weights_offloaded: bool) -> bool:
    """Install the fused decoder-layer forward where ``generation.fused_layers`` asks for it."""
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
    fused = install_fused_layers(model)
    if fused == 0:
        logger.log(
            logging.WARNING if wanted is True else logging.INFO,
            "generation.fused_layers: no decoder layer of %s can be fused; transformers' layers run",
            type(model).__name__,
        )
    return fused > 0


def attach_model(model: PreTrainedModel, config: OmniKVConfig, device: torch.device) -> tuple[str, bool]:
    """Give `model` OmniKV's attention, fused layers (if asked for) and prefill marks; returns the base
    attention implementation (what :func:`detach_model` restores) and whether layers were fused."""
    base = base_attention(model, config)
    model.set_attn_implementation(register_attention(base))
    fused = _fuse_layers(model, device, config.generation.fused_layers, config.distributed.offload_weights)
    mark_prefill_forwards(model)  # model.generate with a cache from new_cache() tells prefill from decode
    return base, fused


def detach_model(model: PreTrainedModel, base: str) -> None:
    """Undo :func:`attach_model`: attention implementation `base`, the layers' own forward, the model's
    own input preparation."""
    model.set_attn_implementation(base)
    remove_fused_layers(model)
    unmark_prefill_forwards(model)

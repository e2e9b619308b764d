"""Fused decoder layers: a Llama-architecture layer's own math in fewer kernels, for the runtime's cache.

transformers runs a Llama decoder layer as about 37 kernels besides attention for each forward:
its RMSNorm is seven (cast, square, mean, add, rsqrt, multiply, scale), the rotary embedding of
queries and keys about ten, the SiLU gate two, plus the projections and residual adds. In a decode
step replayed from a CUDA graph the launches cost nothing, but each small kernel still occupies
the GPU for 1-2 µs: over 32 layers that is ~1.8 ms per token, a third of the step's HBM roofline
at Llama-3-8B geometry. The fused forward computes the same layer with one kernel per RMSNorm, one
for the rotary embedding of queries and keys together, and one for the SiLU-gated product
(:mod:`omnikv_runtime.kernels.layer_ops`); the attention function is transformers' own, and so are
the residual adds where the projections are torch's. A decode step's projections (one token a row, up to
16 rows on CUDA) run through
:mod:`omnikv_runtime.kernels.decode_linear`: query, key and value in one launch, the output projection,
gate and up in one launch that writes the SiLU-gated product, the down projection: four launches a layer
where cuBLAS and the SiLU kernel took eight plus five of cuBLAS's split-K sums (8.5% off the step at 128K
tokens, H100). The output and down launches also add the residual, so the layer's two residual adds need no
kernels of their own there. Wider decode inputs and prefill chunks go to torch's linear. Those kernels' rows have the
same bits whatever the number of rows; with ``generation.batch_invariant`` they take a decode step's rows
at any count (past 16 rows each weight is read once per 16), and the LM head runs through
:func:`~omnikv_runtime.kernels.invariant_linear.invariant_linear`, so a request's tokens do not depend on
its batch.

Like DeepSpeed's kernel injection, this replaces each supported layer's ``forward`` in place; no
weight is copied or moved. The replacement is inert unless the runtime's own cache asks for it
(``cache.fused_layers``, set from ``generation.fused_layers``): a forward without a cache, with
another cache, or with positional arguments runs transformers' forward unchanged. Forward hooks
on the layer's attention and MLP submodules do not run in a fused forward (the layer's own do).
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from omnikv_runtime.kernels.decode_linear import BLOCK_M, gated_linear, grouped_linear
from omnikv_runtime.kernels.invariant_linear import invariant_linear
from omnikv_runtime.kernels.layer_ops import rms_norm, rotary_embedding, silu_mul

logger = logging.getLogger(__name__)

SUPPORTED_LAYER_CLASSES = ("LlamaDecoderLayer",)
# DeepSpeed AutoTP's sharded linear layers (the second all-reduces its output): still linear maps
TENSOR_PARALLEL_LINEARS = ("LinearLayer", "LinearAllreduce")
_CACHE_KEYWORDS = ("cache", "past_key_values")
_NOT_FOR_ATTENTION = (*_CACHE_KEYWORDS, "position_embeddings", "attention_mask")


def decoder_layers(model: PreTrainedModel) -> list[nn.Module]:
    """The model's decoder layers (``model.model.layers`` for transformers' causal LMs), or []."""
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def why_not_fusable(layer: nn.Module) -> str | None:
    """None if the fused forward computes exactly what ``layer`` computes, else the reason it does not."""
    name = type(layer).__name__
    if name not in SUPPORTED_LAYER_CLASSES:
        return f"{name} is not one of {', '.join(SUPPORTED_LAYER_CLASSES)}"
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    projections = [getattr(attention, p, None) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    projections += [getattr(mlp, p, None) for p in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) or type(p).__name__ in TENSOR_PARALLEL_LINEARS for p in projections):
        return f"{name}'s projections are not plain linear layers (quantized or replaced)"
    activation = type(getattr(mlp, "act_fn", None))
    if not (issubclass(activation, nn.SiLU) or activation.__name__ == "SiLUActivation"):  # transformers' own SiLU
        return f"{name}'s MLP activation is {activation.__name__}, not SiLU"
    for norm in (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None)):
        if type(norm).__name__ != "LlamaRMSNorm" or not hasattr(norm, "variance_epsilon"):
            return f"{name}'s norms are not LlamaRMSNorm"
    return None


def install_fused_layers(model: PreTrainedModel, batch_invariant: bool = False) -> int:
    """Give every fusable decoder layer the fused forward (once; ``batch_invariant``: its projections, and the
    LM head, through the batch-invariant linear); returns how many layers have it."""
    fused = 0
    reasons = set()
    set_invariant_head(model, batch_invariant)
    for layer in decoder_layers(model):
        if hasattr(layer, "_omnikv_unfused_forward"):
            layer._omnikv_batch_invariant = batch_invariant
            fused += 1
            continue
        reason = why_not_fusable(layer)
        if reason is not None:
            reasons.add(reason)
            continue
        layer._omnikv_unfused_forward = layer.forward
        layer._omnikv_batch_invariant = batch_invariant
        layer.forward = types.MethodType(_fused_forward, layer)
        fused += 1
    if reasons:
        logger.info("fused layers: %d layers keep transformers' forward (%s)", len(reasons), "; ".join(sorted(reasons)))
    return fused


def remove_fused_layers(model: PreTrainedModel) -> int:
    """Give every fused decoder layer its own forward back (undoes :func:`install_fused_layers`);
    returns how many layers it restored."""
    restored = 0
    set_invariant_head(model, False)
    for layer in decoder_layers(model):
        layer.__dict__.pop("_omnikv_batch_invariant", None)
        original = layer.__dict__.pop("_omnikv_unfused_forward", None)
        if original is None:
            continue
        if getattr(original, "__self__", None) is layer and original.__func__ is type(layer).forward:
            layer.__dict__.pop("forward", None)  # the class's own forward shows again
        else:
            layer.forward = original  # a forward set on the instance before fusing
        restored += 1
    return restored


def set_invariant_head(model: PreTrainedModel, batch_invariant: bool) -> None:
    """Run the model's LM head (a plain ``nn.Linear``) through the batch-invariant linear, or give it its own
    forward back."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear:
        return
    if batch_invariant and "forward" not in head.__dict__:
        head.forward = types.MethodType(_invariant_forward, head)
    elif not batch_invariant and getattr(head.__dict__.get("forward"), "__func__", None) is _invariant_forward:
        del head.forward


def _one_token_a_row(hidden: torch.Tensor) -> bool:
    """Whether ``hidden`` ``[batch, tokens, features]`` is a decode step's (or a last position's): one token a row,
    the input whose row count is the batch's. A prefill chunk's shape is the chunk's, alone or in a server."""
    return hidden.dim() == 3 and hidden.shape[1] == 1


def _invariant_forward(self: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    if _one_token_a_row(hidden):
        return invariant_linear(hidden, self.weight, self.bias)
    return nn.functional.linear(hidden, self.weight, self.bias)


def _project(layer: nn.Module, projection: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``projection(hidden)``; through the batch-invariant linear where the layer asks for it, the input is one
    token a row and the projection is a plain ``nn.Linear`` (DeepSpeed's sharded layers keep their own forward:
    they all-reduce)."""
    if layer._omnikv_batch_invariant and type(projection) is nn.Linear and _one_token_a_row(hidden):
        return invariant_linear(hidden, projection.weight, projection.bias)
    return projection(hidden)


def _grouped_decode(layer: nn.Module, normed: torch.Tensor) -> bool:
    """Whether this forward's projections run through the grouped kernel (query/key/value in one launch, output,
    gate/up with the SiLU product, down): a decode step's input (one token a row) on CUDA, plain bias-free
    linear layers in the input's dtype, and either at most one row tile or ``batch_invariant`` (the grouped
    kernel's rows do not depend on the row count, but past one tile it reads each weight once per tile, where
    cuBLAS reads it once)."""
    if not (normed.is_cuda and _one_token_a_row(normed)):
        return False
    if not (layer._omnikv_batch_invariant or normed.shape[0] <= BLOCK_M):
        return False
    attention, mlp = layer.self_attn, layer.mlp
    projections = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj)
    projections += (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    return all(type(p) is nn.Linear and p.bias is None and p.weight.dtype == normed.dtype for p in projections)


def _attention_function(attention: nn.Module):
    eager = getattr(sys.modules[type(attention).__module__], "eager_attention_forward", None)
    return ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager)


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """A Llama decoder layer (pre-norm attention, then pre-norm SiLU-gated MLP) through fused kernels."""
    cache = next((kwargs[k] for k in _CACHE_KEYWORDS if kwargs.get(k) is not None), None)
    if args or not getattr(cache, "fused_layers", False) or kwargs.get("position_embeddings") is None:
        return self._omnikv_unfused_forward(hidden_states, *args, **kwargs)
    attention, mlp = self.self_attn, self.mlp
    norm = self.input_layernorm
    normed = rms_norm(hidden_states, norm.weight, norm.variance_epsilon)
    by_head = (*hidden_states.shape[:-1], -1, attention.head_dim)
    grouped = _grouped_decode(self, normed)
    if grouped:
        weights = (attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight)
        query, key, value = (out.view(by_head) for out in grouped_linear(normed, weights))
    else:
        query = _project(self, attention.q_proj, normed).view(by_head)
        key = _project(self, attention.k_proj, normed).view(by_head)
        value = _project(self, attention.v_proj, normed).view(by_head)
    value = value.transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    query, key = rotary_embedding(query, key, cos, sin)
    key, value = cache.update(key, value, attention.layer_idx)
    extra = {name: arg for name, arg in kwargs.items() if name not in _NOT_FOR_ATTENTION}
    attended, _ = _attention_function(attention)(
        attention,
        query,
        key,
        value,
        kwargs.get("attention_mask"),
        dropout=attention.attention_dropout if attention.training else 0.0,
        scaling=attention.scaling,
        **extra,
    )
    attended = attended.reshape(*hidden_states.shape[:-1], -1).contiguous()
    if grouped:  # the residual adds happen in the projections' launches
        (hidden_states,) = grouped_linear(attended, [attention.o_proj.weight], residual=hidden_states)
    else:
        hidden_states = hidden_states + _project(self, attention.o_proj, attended)
    norm = self.post_attention_layernorm
    normed = rms_norm(hidden_states, norm.weight, norm.variance_epsilon)
    if grouped:
        gated = gated_linear(normed, mlp.gate_proj.weight, mlp.up_proj.weight)
        return grouped_linear(gated, [mlp.down_proj.weight], residual=hidden_states)[0]
    gated = silu_mul(_project(self, mlp.gate_proj, normed), _project(self, mlp.up_proj, normed))
    return hidden_states + _project(self, mlp.down_proj, gated)

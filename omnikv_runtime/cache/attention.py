"""The ``"omnikv"`` attention function, registered with transformers' AttentionInterface.

It wraps a base implementation (sdpa, eager or flash-attention) and adds what OmniKV needs:

- with no OmniKV cache involved (training, scoring, another cache) it is the base function;
- during prefill it is the base function over a dense layer's KV, and it tells the cache which
  columns are real tokens (the padding mask) and, at a filter layer, the recent queries; a sparse
  layer's chunk after the first attends to its earlier tokens read back from the host tier a block
  at a time, merged by log-sum-exp (:mod:`omnikv_runtime.cache.prefill_blocks`), so its memory does
  not grow with the context; a packed prefill (several requests' chunks in one sequence,
  :mod:`~omnikv_runtime.cache.packed`) runs that per request, each over its own KV with the mask its
  chunk alone would get;
- during decode it reads what the cache's ``update`` described (a dense layer's buffer, or a
  sparse layer's selected rows and tail ring) with :func:`~omnikv_runtime.kernels.decode_attention`,
  without concatenating or repeating KV heads, and a filter layer then asks the cache to select
  tokens for its segment (which starts their fetch). The cache's own valid-column mask applies;
  the model's decode mask is not read, so the step has no shape that grows.

A mask function is registered under the same name (the base's), or transformers would build none.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch.nn.attention.bias import causal_lower_right
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    eager_mask,
    flash_attention_mask,
    sdpa_mask,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from omnikv_runtime.cache.adapter import take_note
from omnikv_runtime.cache.packed import PackedPrefill
from omnikv_runtime.cache.prefill_blocks import attend_over_blocks, check_attention_options, merge
from omnikv_runtime.errors import ConfigError
from omnikv_runtime.kernels import decode_attention
from omnikv_runtime.layout import Role


def prefill_sdpa_mask(*args, **kwargs):
    """transformers' sdpa mask, except that a chunk of a prefill without padding gets none.

    Materialised, a chunk's causal mask is ``[batch, 1, q, kv]`` (512 MB for a 4096-token chunk
    after 128K tokens) and forces SDPA off its flash kernel. Without it the attention function
    runs flash with the causal diagonal at the bottom right (:func:`causal_chunk_attention`). One
    host check of the padding mask per forward (prefill only; decode steps never build masks).
    """
    padding = kwargs.get("attention_mask")
    plain_causal = kwargs.get("mask_function", causal_mask_function) is causal_mask_function
    if kwargs.get("q_length", 1) > 1 and plain_causal and not kwargs.get("kv_offset", 0):
        if padding is None or bool(padding.all()):
            return None
    return sdpa_mask(*args, **kwargs)


BASE_MASK_FUNCTIONS: dict[str, Callable] = {
    "sdpa": prefill_sdpa_mask,
    "eager": eager_mask,
    "flash_attention_2": flash_attention_mask,
}


def causal_chunk_attention(query, key, value, scaling: float) -> tuple[torch.Tensor, None]:
    """Causal attention of the last ``q`` positions over ``kv >= q`` keys (a prefill chunk after
    earlier ones), the diagonal at the bottom right, GQA without repeating KV heads.

    On CUDA in half precision: cuDNN's fused attention (the Hopper kernel torch picks for a one-shot
    prefill), run twice, over the earlier keys without a mask and over the chunk's own keys with a
    causal one, and merged by their log-sum-exp; where cuDNN declines, FlashAttention-2, whose
    causal mask is bottom-right aligned. Elsewhere torch's SDPA with a bottom-right causal bias.
    """
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and query.shape[-1] % 8 == 0:
        try:
            output = _cudnn_chunk_attention(query, key, value, scaling)
        except RuntimeError:  # cuDNN missing or declining these shapes
            flash = torch.ops.aten._scaled_dot_product_flash_attention
            output = flash(query, key, value, 0.0, is_causal=True, return_debug_mask=False, scale=scaling)[0]
    else:
        bias = causal_lower_right(query.shape[2], key.shape[2])
        gqa = query.shape[1] != key.shape[1]
        output = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, scale=scaling, enable_gqa=gqa
        )
    return output.transpose(1, 2).contiguous(), None


def _cudnn_chunk_attention(query, key, value, scaling: float) -> torch.Tensor:
    past = key.shape[2] - query.shape[2]
    cudnn = torch.ops.aten._scaled_dot_product_cudnn_attention
    parts = []
    for keys, values, causal in (
        (key[:, :, :past], value[:, :, :past], False),
        (key[:, :, past:], value[:, :, past:], True),
    ):
        output, lse = cudnn(query, keys, values, None, True, 0.0, causal, False, scale=scaling)[:2]
        parts.append((output.float(), lse.float().reshape(*query.shape[:3], 1)))
    return merge(*parts)[0].to(query.dtype)


def eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain matmul-softmax attention, as the Llama-family ``eager`` path computes it."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def attention_name(base: str) -> str:
    """The registered name for OmniKV over base implementation ``base``."""
    return "omnikv" if base == "sdpa" else f"omnikv_{base}"


def base_implementation(name: str | None) -> str | None:
    """The base implementation under a model's attention implementation ``name`` (``"omnikv_eager"`` ->
    ``"eager"``, ``"sdpa"`` -> ``"sdpa"``), or None when it is not one the runtime wraps."""
    base = name or ""
    if base.startswith("omnikv"):
        base = base.removeprefix("omnikv").removeprefix("_") or "sdpa"
    return base if base in BASE_MASK_FUNCTIONS else None


def attention_scaling(module: torch.nn.Module, query: torch.Tensor, kwargs: dict) -> float:
    """The softmax scale an attention call uses: its ``scaling`` argument, the module's, else 1/sqrt(head_dim)."""
    return kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)


def _base_function(base: str) -> Callable:
    if base == "eager":
        return eager_attention
    return ALL_ATTENTION_FUNCTIONS[base]


def valid_columns(attention_mask: torch.Tensor | None, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``[batch, length]`` bool: the columns the last query may attend to (False at padding)."""
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=device)
    if attention_mask.dim() == 2:  # flash-attention style [batch, kv] padding mask
        valid = attention_mask.bool()
    else:
        row = attention_mask[:, 0, -1]  # the last query's row of [batch, 1, q, kv]
        if row.dtype == torch.bool:
            valid = row
        elif row.is_floating_point():
            valid = row > torch.finfo(row.dtype).min / 2
        else:
            valid = row != 0
    return valid[..., :length].expand(batch, length)


def solo_chunk_mask(base: str, query: torch.Tensor, length: int) -> torch.Tensor | None:
    """The mask a request's prefill chunk of ``q`` queries over its ``length`` keys so far gets when it runs
    alone (its padding-free causal mask, the diagonal at the bottom right): none for SDPA and flash-attention,
    which are causal without one (:func:`causal_chunk_attention` for a chunk after earlier ones), a
    boolean ``[1, 1, q, length]`` for the eager path."""
    count = query.shape[2]
    if base != "eager" or count == 1:
        return None
    return torch.ones(count, length, dtype=torch.bool, device=query.device).tril(length - count)[None, None]


def make_attention_function(base: str) -> Callable:
    """The OmniKV attention function over base implementation ``base``."""
    base_function = _base_function(base)

    def prefill(module, layer_idx, cache, query, key, value, attention_mask, kwargs, earlier=None):
        """One request's prefill chunk (``cache``: its OmniKVCache) over all its KV so far: ``key`` and
        ``value`` hold it, or, for a sparse layer, the chunk alone and ``earlier`` says where the rest is."""
        if layer_idx == 0:
            cache.record_prompt_mask(valid_columns(attention_mask, key.shape[0], key.shape[2], key.device))
        if earlier is not None:  # a sparse layer: its earlier tokens are in the host tier
            check_attention_options(kwargs)
            scaling = attention_scaling(module, query, kwargs)
            return attend_over_blocks(query, key, value, earlier, attention_mask, scaling), None
        if base == "sdpa" and attention_mask is None and 1 < query.shape[2] < key.shape[2]:
            output = causal_chunk_attention(query, key, value, attention_scaling(module, query, kwargs))
        else:
            output = base_function(module, query, key, value, attention_mask, **kwargs)
        if cache.plan.role(layer_idx) is Role.FILTER:
            cache.remember_queries(layer_idx, query)
        return output

    def packed_prefill(module, layer_idx, cache: PackedPrefill, query, kwargs):
        """Several requests' chunks packed in one sequence: each attends to its own KV, as it would alone."""
        positions = kwargs.get("position_ids")
        outputs = []
        for span in cache.take_spans(layer_idx):
            part_kwargs = dict(kwargs)
            if positions is not None:
                part_kwargs["position_ids"] = positions[:, span.start : span.stop]
            part_query = query[:, :, span.start : span.stop]
            earlier = span.earlier.tokens if span.earlier is not None else 0  # a sparse layer's, in the host tier
            mask = solo_chunk_mask(base, part_query, earlier + span.keys.shape[2])
            output, _ = prefill(
                module, layer_idx, span.cache, part_query, span.keys, span.values, mask, part_kwargs, span.earlier
            )
            outputs.append(output)
        return torch.cat(outputs, dim=1), None

    def omnikv_attention(module, query, key, value, attention_mask, **kwargs):
        note = take_note(getattr(module, "layer_idx", -1), key)
        if note is None:
            if base == "sdpa" and attention_mask is None and 1 < query.shape[2] < key.shape[2]:
                return causal_chunk_attention(query, key, value, attention_scaling(module, query, kwargs))
            return base_function(module, query, key, value, attention_mask, **kwargs)
        cache = note.cache
        if isinstance(cache, PackedPrefill):
            return packed_prefill(module, note.layer_idx, cache, query, kwargs)
        if note.sources is not None:  # a static decode step
            scaling = attention_scaling(module, query, kwargs)
            batch, heads, _, dim = query.shape
            if cache.plan.role(note.layer_idx) is not Role.FILTER:
                return decode_attention(query[:, :, 0], note.sources, scaling).view(batch, 1, heads, dim), None
            # a filter layer: the attention also writes the policy's scores where the policy reads them
            head_max = cache.head_max_buffer(note.layer_idx, query)
            output = decode_attention(query[:, :, 0], note.sources, scaling, head_max=head_max)
            cache.select(note.layer_idx, query, scaling, head_max)
            return output.view(batch, 1, heads, dim), None
        return prefill(module, note.layer_idx, cache, query, key, value, attention_mask, kwargs, note.earlier)

    omnikv_attention.__name__ = f"omnikv_attention_{base}"
    return omnikv_attention


def register_attention(base: str) -> str:
    """Register OmniKV over ``base`` (and its mask function); returns the name to set on a model."""
    if base not in BASE_MASK_FUNCTIONS:
        raise ConfigError("model.attn_implementation", base, f"one of {sorted(BASE_MASK_FUNCTIONS)}")
    if base.startswith("flash") and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation",
            base,
            "'sdpa' or 'eager' here: flash-attn is not installed (`pip install omnikv-runtime[flash]`, CUDA only)",
        )
    name = attention_name(base)
    AttentionInterface.register(name, make_attention_function(base))
    AttentionMaskInterface.register(name, BASE_MASK_FUNCTIONS[base])
    return name

"""Checking what ``generate`` is asked before anything runs: ids, mask, lengths, option merging.

Every check raises :class:`~omnikv_runtime.errors.PromptError` with what to change, so that bad
input never reaches torch (where a negative id, a float id or a 3-D batch fails deep inside an
embedding or a reshape) and a value is never silently replaced by a default.
"""

from __future__ import annotations

import copy
import logging
import operator
from typing import Any

import torch

from omnikv_runtime.errors import PromptError

logger = logging.getLogger(__name__)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def as_token_count(name: str, value: Any) -> int:
    """``value`` as a whole number of tokens (an int, a numpy or 0-d torch integer); PromptError otherwise."""
    if isinstance(value, bool) or (torch.is_tensor(value) and value.dtype == torch.bool):
        raise PromptError(f"{name} must be a whole number of tokens, got the boolean {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise PromptError(
            f"{name} must be a whole number of tokens (an int), got {_shown(value)} ({type(value).__name__})"
        ) from None


def check_input_ids(input_ids: Any, vocab_size: int | None) -> torch.Tensor:
    """``input_ids`` (a tensor or nested lists of ints) as a ``[batch, tokens]`` int64 tensor.

    Refuses float, boolean or complex ids, ragged lists, anything that is not 1-D or 2-D, an empty
    batch, and ids outside ``[0, vocab_size)``.
    """
    if torch.is_tensor(input_ids):
        ids = input_ids
    else:
        try:
            ids = torch.as_tensor(input_ids)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise PromptError(
                f"input_ids must be token ids (a tensor or lists of ints of equal length), got "
                f"{type(input_ids).__name__}: {exc}. Pad the rows to one length and pass attention_mask"
            ) from None
        if ids.numel() == 0:  # [] or [[]]: an empty prompt, whose dtype torch guesses as float
            ids = ids.long()
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise PromptError(
            f"input_ids must be integer token ids, got dtype {str(ids.dtype).removeprefix('torch.')}: "
            "pass the tokenizer's ids (int64), not embeddings or probabilities"
        )
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2:
        raise PromptError(
            f"input_ids must be 1-D [tokens] or 2-D [batch, tokens], got shape {tuple(ids.shape)}: "
            "drop the extra dimensions (e.g. ids.squeeze(0) for a [1, batch, tokens] tensor)"
        )
    if ids.shape[0] == 0:
        raise PromptError("input_ids holds no rows (batch of 0): give at least one prompt")
    ids = ids.long()
    if ids.numel() and vocab_size is not None:
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            row, column = (ids == bad).nonzero()[0].tolist()
            raise PromptError(
                f"input_ids[{row}, {column}] = {bad} is outside the model's vocabulary (ids 0 to {vocab_size - 1}): "
                "encode the prompt with this model's tokenizer"
            )
    return ids


def check_attention_mask(attention_mask: Any, ids: torch.Tensor) -> torch.Tensor | None:
    """The mask as int64 of the ids' shape (1 = token, 0 = padding); PromptError when it cannot be one."""
    if attention_mask is None:
        return None
    try:
        mask = torch.as_tensor(attention_mask)
    except (TypeError, ValueError, RuntimeError) as exc:
        kind = type(attention_mask).__name__
        raise PromptError(f"attention_mask must be a tensor or lists of 0/1, got {kind}: {exc}") from None
    if mask.numel() != ids.numel() or (mask.dim() > 1 and mask.shape[-1] != ids.shape[-1]):
        raise PromptError(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids has shape {tuple(ids.shape)}: "
            "give one 0/1 per token"
        )
    mask = mask.reshape(ids.shape)
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise PromptError("attention_mask must hold only 0 (padding) and 1 (token)")
    mask = mask.long()
    empty = (mask.sum(dim=1) == 0).nonzero()
    if ids.shape[1] and empty.numel():
        raise PromptError(f"row {int(empty[0])} of attention_mask masks every token: each prompt needs a token")
    return mask


def new_token_count(
    max_new_tokens: Any, max_length: Any, prompt_tokens: int, generation_config: Any, default: int
) -> int:
    """How many tokens to generate: ``max_new_tokens``, else ``max_length`` minus the prompt, else the
    ``max_new_tokens`` of a ``generation_config`` passed in, else ``default``.

    Both given: ``max_new_tokens`` wins (as in transformers), with a warning.
    """
    if max_new_tokens is not None:
        count = as_token_count("max_new_tokens", max_new_tokens)
        if count < 1:
            raise PromptError(
                f"max_new_tokens must be at least 1, got {count}: to only score the prompt, call the model's forward"
            )
        if max_length is not None:
            as_token_count("max_length", max_length)
            logger.warning("generate got both max_new_tokens and max_length; max_new_tokens=%d wins", count)
        return count
    if max_length is not None:
        length = as_token_count("max_length", max_length)
        if length <= prompt_tokens:
            raise PromptError(
                f"max_length={length} leaves no room after the prompt's {prompt_tokens} tokens: max_length counts "
                "the prompt too; raise it or pass max_new_tokens"
            )
        return length - prompt_tokens
    configured = getattr(generation_config, "max_new_tokens", None) if generation_config is not None else None
    if configured is not None:
        return new_token_count(configured, None, prompt_tokens, None, default)
    return default


def with_generation_options(
    kwargs: dict[str, Any], forced: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """``kwargs`` for transformers' ``generate`` with ``forced`` options set and ``defaults`` set where the
    caller gave none. With a ``generation_config`` among ``kwargs`` they go into a copy of it (transformers
    deprecates a config passed together with generation arguments), else they become keyword arguments."""
    merged = dict(kwargs)
    config = merged.get("generation_config")
    if config is None:
        merged.update(forced or {})
        for key, value in (defaults or {}).items():
            if merged.get(key) is None:
                merged[key] = value
        return merged
    config = copy.deepcopy(config)
    for key, value in (forced or {}).items():
        merged.pop(key, None)
        setattr(config, key, value)
    for key, value in (defaults or {}).items():
        if merged.get(key) is None and getattr(config, key, None) is None:
            setattr(config, key, value)
    merged["generation_config"] = config
    return merged


def vocabulary_size(model: Any) -> int | None:
    """Rows of the model's input embedding (the ids it accepts), else ``config.vocab_size``."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    return rows if rows is not None else getattr(model.config.get_text_config(decoder=True), "vocab_size", None)


def check_generate_call(
    model: Any, default_new: int, input_ids: Any, attention_mask: Any, max_new_tokens: Any, kwargs: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None, int, dict[str, Any]]:
    """``Engine.generate``'s arguments checked: ``(ids, mask, new tokens, kwargs)``; ``max_length`` is
    turned into the new-token count, and without a ``generation_config`` decoding is greedy unless
    ``do_sample`` says otherwise."""
    if "past_key_values" in kwargs or "cache" in kwargs:
        raise PromptError("Engine.generate makes its own cache; call model.generate to pass one")
    ids = check_input_ids(input_ids, vocabulary_size(model))
    mask = check_attention_mask(attention_mask, ids)
    kwargs = dict(kwargs)
    max_length = kwargs.pop("max_length", None)
    new = new_token_count(max_new_tokens, max_length, ids.shape[1], kwargs.get("generation_config"), default_new)
    if kwargs.get("generation_config") is None:  # a config passed in says itself whether to sample
        kwargs.setdefault("do_sample", False)
    return ids, mask, new, kwargs

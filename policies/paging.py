"""The context in pages: consecutive tokens grouped for policies that score groups, not tokens.

Quest scores pages of ``page_size`` tokens by their keys' bounds, InfLLM blocks of ``block_size`` tokens
by representative keys. Both split the selectable context into groups of consecutive tokens, the last
one padded, with a mask of the tokens that count; :func:`paged` does that split once for both.
:func:`omnikv_runtime.policies.base.ranked_groups` turns the groups' scores back into token scores.
"""

from __future__ import annotations

import torch


def paged(keys: torch.Tensor, valid: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the context into pages of ``page_size`` consecutive tokens; the last page is padded.

    Token ``t`` lands in page ``t // page_size`` at offset ``t % page_size``.

    Args:
        keys: ``[batch, kv_heads, context_len, head_dim]``.
        valid: ``[batch, context_len]`` bool, the tokens that count (e.g. real and visible to the query).
        page_size: tokens per page, at least 1.

    Returns:
        ``keys`` as ``[batch, kv_heads, pages, page_size, head_dim]`` (zeros at padding) and ``valid`` as
        ``[batch, pages, page_size]`` (False at padding), where ``pages = ceil(context_len / page_size)``.
    """
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be an integer of at least 1, got {page_size!r}")
    if keys.dim() != 4 or valid.shape != (keys.shape[0], keys.shape[2]) or valid.dtype != torch.bool:
        raise ValueError(
            f"valid {tuple(valid.shape)} {valid.dtype} must be a bool [batch, context_len] mask for keys "
            f"[batch, kv_heads, context_len, head_dim], got keys {tuple(keys.shape)}"
        )
    batch, kv_heads, length, dim = keys.shape
    pages = -(-length // page_size)
    pad = pages * page_size - length
    keys = torch.nn.functional.pad(keys, (0, 0, 0, pad)).reshape(batch, kv_heads, pages, page_size, dim)
    valid = torch.nn.functional.pad(valid, (0, pad)).reshape(batch, pages, page_size)
    return keys, valid

"""A decoder's rotary inverse frequencies, for selection policies that turn a stored query to another position.

The OmniKV window selectors score every query of their window at the current step's position,
while the queries reach the runtime already rotated at their own positions. RoPE rotates each pair
of a query's dimensions by ``position * inv_freq``, so with the model's ``inv_freq`` a policy can
turn a query from one position to another (``omnikv_runtime.policies.base.queries_at_current_position``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def rotary_inverse_frequencies(model: nn.Module, device: torch.device | None = None) -> torch.Tensor | None:
    """``[rotary_dim // 2]`` float32 on `device`: the inverse frequencies `model`'s rotary embedding uses.

    Read from the ``inv_freq`` buffer of the model's rotary embedding module (``model.model.rotary_emb``
    in transformers' Llama, Mistral and Qwen classes), so a RoPE scaling of the checkpoint (llama3,
    YaRN, linear) is already in it; a scaling that recomputes its frequencies as the sequence grows
    (dynamic NTK) is read as it stands now. None, with one log line, for a model without one.
    """
    for name, module in model.named_modules():
        inv_freq = getattr(module, "inv_freq", None)
        if name.endswith("rotary_emb") and isinstance(inv_freq, torch.Tensor):
            return inv_freq.detach().to(device=device, dtype=torch.float32)
    logger.info(
        "no rotary embedding module with inv_freq in %s: window selectors score queries at their own positions",
        type(model).__name__,
    )
    return None

"""Choosing the next token on the device: greedy, or sampled with temperature, top-k and top-p.

Everything is a fixed-shape tensor operation with no value read back to the host, so it runs
inside a captured decode step. Sampling draws with the exponential-race trick (the argmax of
``p / E`` with ``E ~ Exp(1)`` is a sample from ``p``), which needs no ``multinomial``. The order of
the warpers is transformers' own: temperature, then top-k, then top-p. A temperature below
:data:`MIN_SAMPLING_TEMPERATURE` chooses greedily: dividing float32 logits by it can overflow to
infinity (the probabilities then turn NaN), and a sample at it is the most likely token anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# Below this, sampling is greedy. At 1e-5 a logit gap of 1e-3 is already a factor e^100 between two tokens'
# probabilities, and float32 overflows only past logits of 3e33; at 1e-38 and below it overflows for any logit.
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen (the subset of transformers' ``GenerationConfig`` run on the GPU)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0.0:
            raise ValueError(f"temperature must be positive when sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    @classmethod
    def from_generation(cls, generation_config: Any, overrides: dict[str, Any]) -> SamplingSettings:
        """Settings from a model's ``generation_config``, overridden by ``generate`` keyword arguments."""

        def pick(name: str, default: Any) -> Any:
            value = overrides.get(name)
            if value is None:
                value = getattr(generation_config, name, None)
            return default if value is None else value

        do_sample = bool(pick("do_sample", False))
        if not do_sample:
            return cls()
        top_k = int(pick("top_k", 0)) or None
        top_p = float(pick("top_p", 1.0))
        return cls(True, float(pick("temperature", 1.0)), top_k, None if top_p >= 1.0 else top_p)


def choose_tokens(
    logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The next token of each row, ``[batch]`` int64, from ``logits`` ``[batch, vocab]`` (sampling
    draws from ``generator`` when given: a seeded request's own stream of random numbers). Greedy, drawing
    nothing, without sampling or below :data:`MIN_SAMPLING_TEMPERATURE`."""
    if not settings.do_sample or settings.temperature < MIN_SAMPLING_TEMPERATURE:
        return logits.argmax(dim=-1)
    scores = logits.float() / settings.temperature
    if settings.top_k is not None and settings.top_k < scores.shape[-1]:
        kth = torch.topk(scores, settings.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if settings.top_p is not None:
        ascending, order = torch.sort(scores, dim=-1)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1.0 - settings.top_p
        drop[:, -1] = False  # the most likely token always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = scores.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)

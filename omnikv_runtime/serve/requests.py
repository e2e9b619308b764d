"""What the HTTP layer hands the scheduler, and what it gets back.

The scheduler runs on its own thread. The HTTP layer turns a request body into a
:class:`ServeRequest` (token ids already: chat templates are applied before), calls
``Scheduler.submit(request, on_event)`` and receives :class:`RequestEvent` objects through
``on_event``, which is called on the scheduler's thread (hand them to the event loop with
``loop.call_soon_threadsafe``). The last event of a request has ``finish_reason`` set.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from omnikv_runtime.decode.sampling import SamplingSettings
from omnikv_runtime.serve.text import TextStream


@dataclass(frozen=True)
class ServeRequest:
    """One completion to generate.

    Attributes:
        request_id: the id the response carries (``cmpl-...`` / ``chatcmpl-...``).
        prompt_ids: the prompt's token ids (at least one).
        max_tokens: new tokens at most (at least one).
        temperature: 0 picks the most likely token (greedy); otherwise sampling at this temperature.
        top_p: nucleus sampling: keep the smallest set of tokens whose probability reaches ``top_p``.
        seed: the sampling seed; the same seed and prompt give the same tokens, whatever else runs
            in the batch. None: a seed drawn by the scheduler.
        stop: strings that end the completion; the text returned stops before the first of them.
    """

    request_id: str
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass
class RequestEvent:
    """New output of one request since its previous event.

    Attributes:
        text: new text (may be empty: a token can end inside a multi-byte character, or in a
            possible stop string, whose text is held back until it is known not to be one).
        token_ids: the new tokens.
        finish_reason: None while the request runs; then ``"stop"`` (end-of-sequence token or a
            stop string), ``"length"`` (``max_tokens`` reached), ``"cancelled"`` or ``"error"``.
        prompt_tokens: tokens of the prompt.
        completion_tokens: tokens generated so far.
        error: what went wrong, with ``finish_reason == "error"``.
    """

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


class AdmissionError(Exception):
    """A request the scheduler does not take: ``status`` 400 (it can never fit, with the reason)
    or 429 (the queue is full; retry later)."""

    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code  # OpenAI-style error code: "context_length_exceeded", "queue_full", ...


def admission_problem(
    prompt_tokens: int | None, max_tokens: int, max_new_tokens: int, context_limit: int
) -> tuple[str, str] | None:
    """``(message, code)`` of why a request can never be served by a server of ``context_limit`` tokens and
    ``max_new_tokens`` new tokens per request (an empty prompt, ``max_tokens`` below 1 or over the cap, or
    prompt and ``max_tokens`` over the context), or None. ``prompt_tokens`` None checks ``max_tokens`` alone."""
    if prompt_tokens == 0:
        return "the prompt is empty: give at least one token", "empty_prompt"
    if max_tokens < 1:
        return f"max_tokens must be at least 1, got {max_tokens}", "invalid_max_tokens"
    if max_tokens > max_new_tokens:
        return (
            f"max_tokens {max_tokens} is over this server's {max_new_tokens} new tokens per request",
            "max_tokens_exceeded",
        )
    if prompt_tokens is not None and prompt_tokens + max_tokens > context_limit:
        return (
            f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}, "
            f"{prompt_tokens + max_tokens} in all, over this server's context of {context_limit} "
            "tokens: shorten the prompt or lower max_tokens",
            "context_length_exceeded",
        )
    return None


class RequestHandle:
    """A submitted request: :meth:`cancel` ends it (thread-safe; it then ends with ``"cancelled"``)."""

    def __init__(self, cancel: Callable[[str], None], request_id: str) -> None:
        self._cancel, self.request_id = cancel, request_id

    def cancel(self) -> None:
        self._cancel(self.request_id)


@dataclass
class LiveRequest:
    """A request inside the scheduler: what it asked for, where its events go, its text so far, its sampling
    settings and random stream, its slot (``row``) and tokens."""

    request: ServeRequest
    on_event: Callable[[RequestEvent], None]
    text: TextStream
    settings: SamplingSettings
    generator: torch.Generator | None
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    row: int | None = None
    tokens: list[int] = field(default_factory=list)
    reused: int = 0  # prompt tokens whose KV came from the prefix cache

    @classmethod
    def open(
        cls, request: ServeRequest, on_event: Callable[[RequestEvent], None], tokenizer: Any, device: torch.device
    ) -> LiveRequest:
        """The request as it enters the queue: greedy at temperature 0, else sampled with its own generator on
        ``device``, seeded with its seed (or a drawn one)."""
        top_p = None if request.top_p >= 1.0 else request.top_p
        settings = SamplingSettings(request.temperature > 0, request.temperature or 1.0, None, top_p)
        generator = None
        if settings.do_sample:
            generator = torch.Generator(device)
            generator.manual_seed(request.seed if request.seed is not None else random.getrandbits(63))
        return cls(request, on_event, TextStream(tokenizer, request.stop), settings, generator)

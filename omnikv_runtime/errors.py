"""Exceptions raised by omnikv_runtime.

Every error a user can cause (a bad config, an unsupported model, a prompt that does not fit)
has its own class with a message that says what to change; none of them should surface as a
traceback from deep inside torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class OmniKVError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(OmniKVError, ValueError):
    """A config field holds a value that is not allowed.

    The message names the field (dotted path), the value, and what is allowed.
    """

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"config field '{field}' = {value!r} is not allowed: {allowed}")


class ModelLoadError(OmniKVError, RuntimeError):
    """A model could not be loaded; the message says what to install or change."""


class UnsupportedModelError(OmniKVError, ValueError):
    """The model's architecture or attention layout is not one this runtime supports."""


class PromptError(OmniKVError, ValueError):
    """A prompt is empty, or does not fit the model's context window or the runtime's sizing."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' suffix for an unknown name, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""

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

    The message names the field (dotted path), the value, and what is allowed; for a config read
    from a file, ``source`` is that file and the message starts with it. ``problem`` says what is
    wrong when "is not allowed" would mislead (a path that does not exist: ``"no such file"``).
    """

    def __init__(
        self, field: str, value: object, allowed: str, source: str | None = None, problem: str | None = None
    ) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        self.source = source
        self.problem = problem
        where = f"{source}: " if source else ""
        what = f"config field '{field}' = {_short_repr(value)}"
        super().__init__(
            f"{where}{what}: {problem}; allowed: {allowed}" if problem else f"{where}{what} is not allowed: {allowed}"
        )

    def in_file(self, source: str) -> ConfigError:
        """The same error, naming the file the config came from (unchanged if it already names one)."""
        if self.source is not None:
            return self
        return ConfigError(self.field, self.value, self.allowed, source=source, problem=self.problem)


def _short_repr(value: object, limit: int = 200) -> str:
    """``repr(value)``, cut to `limit` characters (a fuzzed or huge value must not flood the message)."""
    try:
        text = repr(value)
    except Exception:  # a deeply nested value, an int past the digit limit, an object whose repr fails
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[: limit - 5]} ...{text[-1]}"


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

"""Request bodies of the OpenAI-compatible API, their checks, and the error body every refusal carries.

Bodies are validated strictly (``"8"`` is not a number, unknown fields are refused, naming the
field). A few OpenAI fields this server does not implement are accepted at their default values
only (``n=1``, ``frequency_penalty=0``, ``logprobs`` null or false, ...): a client library that
always sends them keeps working, and a request that asks for what they do is refused rather than
silently served without it. This module needs pydantic only, not FastAPI.
"""

from __future__ import annotations

import collections
import json
import re
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP_STRINGS = 4  # as OpenAI's API
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}  # pydantic's union-member loc parts


class ApiError(Exception):
    """A refusal with its HTTP status and OpenAI's error body ``{"error": {message, type, param, code}}``."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error"}
    TYPES |= {405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @property
    def type(self) -> str:
        return self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields both endpoints take."""

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what a torch generator takes
    stream: bool = False
    stream_options: StreamOptions | None = None
    # accepted at their defaults only (see check_defaults)
    n: int | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    IGNORED: ClassVar[dict[str, tuple[Any, ...]]] = {  # field -> the values accepted (and ignored)
        "n": (None, 1),
        "frequency_penalty": (None, 0),
        "presence_penalty": (None, 0),
        "logit_bias": (None, {}),
    }

    def check_defaults(self) -> None:
        """Refuse (400, naming the field) an accepted-but-unimplemented field set to anything but its default."""
        for name, allowed in self.IGNORED.items():
            value = getattr(self, name)
            if value not in allowed:
                raise ApiError(
                    400,
                    f"'{name}' is not supported by this server except at its default ({json.dumps(allowed[-1])}); "
                    f"got {json.dumps(value)}",
                    param=name,
                    code="unsupported_value",
                )
        if self.stream_options is not None and not self.stream:
            raise ApiError(
                400, "'stream_options' is allowed only with 'stream': true", "stream_options", "invalid_value"
            )

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ApiError(
                400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop", "invalid_value"
            )
        if any(not each for each in stops):
            raise ApiError(400, "'stop' strings must not be empty", "stop", "invalid_value")
        return tuple(stops)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: one prompt (a string, or a list holding one string)."""

    prompt: str | list[str]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    IGNORED = _Sampling.IGNORED | {"logprobs": (None,), "echo": (False,), "best_of": (None, 1), "suffix": (None,)}

    def prompt_text(self) -> str:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            message = f"'prompt' must be one string (or a list of one); got {len(prompts)}"
            raise ApiError(400, message, "prompt", "invalid_value")
        if not prompts[0]:
            raise ApiError(400, "'prompt' is empty", "prompt", "empty_prompt")
        return prompts[0]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        """``{"role", "content"}`` for a chat template (``developer`` is the newer name of ``system``)."""
        content = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: messages, rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None

    IGNORED = _Sampling.IGNORED | {"logprobs": (None, False), "top_logprobs": (None,)}

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` (the newer name), else ``max_tokens``; None when neither is given."""
        if self.max_completion_tokens is not None and self.max_tokens is not None:
            if self.max_completion_tokens != self.max_tokens:
                message = "give 'max_completion_tokens' or 'max_tokens', not both (or both equal)"
                raise ApiError(400, message, "max_tokens", "invalid_value")
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _param(loc: tuple[Any, ...]) -> str:
    """``messages[0].content`` from pydantic's ``("messages", 0, "content")``, without union-member tags."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif isinstance(part, str) and part.lower() not in _TYPE_TAGS and "[" not in part and "-" not in part:
            text += f".{part}" if text else part
    return text


def _validation_error(exc: ValidationError) -> ApiError:
    """The first problem of a body, as OpenAI words it where it has a wording."""
    errors = exc.errors()
    first = errors[0]
    param = _param(first["loc"])
    if first["type"] == "extra_forbidden":
        return ApiError(400, f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if first["type"] == "missing":
        return ApiError(400, f"Missing required parameter: '{param}'", param, "missing_required_parameter")
    same = [each["msg"] for each in errors if _param(each["loc"]) == param]  # a union's members, one line
    received = first.get("input")
    if isinstance(received, LongInteger):
        shown = f"an integer of {received.digits} digits"
    elif isinstance(received, (str, int, float, bool, type(None))):
        shown = json.dumps(received)[:80]
    else:
        shown = "a value"
    return ApiError(400, f"Invalid '{param}' ({shown}): " + "; or ".join(dict.fromkeys(same)), param, "invalid_value")


class LongInteger:
    """A JSON integer with more digits than Python converts (``sys.get_int_max_str_digits``): kept as its
    digit count, so that the field holding it is refused by name like any other value of the wrong type."""

    def __init__(self, digits: str) -> None:
        self.digits = len(digits.lstrip("-"))


def _integer(digits: str) -> int | LongInteger:
    try:
        return int(digits)
    except ValueError:
        return LongInteger(digits)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate(data: Any) -> ApiError | None:
    """The refusal of the first string (key or value, breadth first) holding a lone surrogate (``\\ud800``
    in JSON), which no text encoding can carry; None when there is none. Walks without recursion."""
    pending: collections.deque[tuple[tuple[Any, ...], Any]] = collections.deque([((), data)])
    while pending:
        loc, value = pending.popleft()
        if isinstance(value, dict):
            for key, item in value.items():
                if _SURROGATE.search(key):
                    return _surrogate_error(loc, key, "A field name in")
                pending.append(((*loc, key), item))
        elif isinstance(value, list):
            pending.extend(((*loc, index), item) for index, item in enumerate(value))
        elif isinstance(value, str) and _SURROGATE.search(value):
            return _surrogate_error(loc, value, "")
    return None


def _surrogate_error(loc: tuple[Any, ...], text: str, what: str) -> ApiError:
    param = _param(loc) or None
    found = _SURROGATE.search(text)
    where = f"{what} '{param}'".strip() if param else "A field name"
    return ApiError(
        400,
        f"{where} holds a lone surrogate (\\u{ord(found.group()):04x} at character {found.start()}): "
        "strings must be Unicode text",
        param,
        "invalid_value",
    )


def parse_body(raw: bytes, model: type[_Sampling], max_messages: int | None = None) -> _Sampling:
    """A request body (bytes of JSON) as `model`, checked; raises :class:`ApiError` (400) naming the problem.
    More than ``max_messages`` chat messages are refused before they are validated one by one."""
    try:
        data = json.loads(raw, parse_int=_integer)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON: {exc}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "The request body nests arrays or objects too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object", code="invalid_json")
    messages = data.get("messages")
    if max_messages is not None and isinstance(messages, list) and len(messages) > max_messages:
        message = (
            f"'messages' holds {len(messages)} messages: more than the {max_messages} tokens this server's context "
            "leaves for a prompt (each message is at least one token)"
        )
        raise ApiError(400, message, "messages", "context_length_exceeded")
    surrogate = _lone_surrogate(data)
    if surrogate is not None:
        raise surrogate
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    body.check_defaults()
    return body

"""Server-sent events of a streamed completion, in OpenAI's chunk format.

Each event is ``data: <JSON chunk>\\n\\n``; the stream ends with ``data: [DONE]\\n\\n``. Chat streams open
with a chunk whose delta carries the role, then one chunk per piece of new text, then a chunk with
an empty delta and the ``finish_reason``. Token usage comes in the last chunk before ``[DONE]``:
with ``stream_options.include_usage`` as OpenAI sends it (every chunk has ``"usage": null`` and a
final chunk with no choices carries it), otherwise in the chunk that has the ``finish_reason``. A
request that fails or is cancelled by the server ends with ``data: {"error": {...}}`` and ``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any

from omnikv_runtime.serve.requests import RequestEvent

DONE = "data: [DONE]\n\n"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def usage_of(event: RequestEvent) -> dict[str, int]:
    total = event.prompt_tokens + event.completion_tokens
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens, "total_tokens": total}


def error_of(event: RequestEvent) -> dict[str, Any]:
    """The error body that ends a stream whose request failed (``error``) or was cancelled by the server."""
    if event.finish_reason == "cancelled":
        message, code = "The request was cancelled (the server is stopping)", "cancelled"
    else:
        message, code = f"Generation failed: {event.error or 'unknown error'}", "generation_error"
    return {"error": {"message": message, "type": "server_error", "param": None, "code": code}}


async def _chunks(
    head: dict[str, Any],
    events: AsyncIterable[RequestEvent],
    include_usage: bool,
    obj: str,
    piece: Any,
    opening: dict[str, Any] | None,
) -> AsyncIterator[str]:
    """The stream: `piece(text)` makes a choice from new text, `piece(None)` the closing choice."""

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {**head, "object": obj, "choices": choices, **extra}
        if include_usage:
            body.setdefault("usage", None)
        return sse(body)

    if opening is not None:
        yield chunk([opening])
    async for event in events:
        if event.finish_reason in ("error", "cancelled"):
            yield sse(error_of(event))
            break
        if event.text:
            yield chunk([piece(event.text)])
        if event.finish_reason is not None:
            closing = {**piece(None), "finish_reason": event.finish_reason}
            if include_usage:
                yield chunk([closing])
                yield chunk([], usage=usage_of(event))
            else:
                yield chunk([closing], usage=usage_of(event))
    yield DONE


def completion_chunks(
    head: dict[str, Any], events: AsyncIterable[RequestEvent], include_usage: bool
) -> AsyncIterator[str]:
    """``text_completion`` chunks: ``choices[0].text`` is the new text."""

    def piece(text: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": None}

    return _chunks(head, events, include_usage, "text_completion", piece, None)


def chat_chunks(head: dict[str, Any], events: AsyncIterable[RequestEvent], include_usage: bool) -> AsyncIterator[str]:
    """``chat.completion.chunk`` chunks: ``choices[0].delta.content`` is the new text."""

    def piece(text: str | None) -> dict[str, Any]:
        delta = {} if text is None else {"content": text}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}

    opening = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    return _chunks(head, events, include_usage, "chat.completion.chunk", piece, opening)

"""The checks in front of every route of the HTTP API, as pure ASGI middleware (Starlette only).

:class:`Guard`, in order: while the server stops, every new request gets 503
``server_shutting_down``; with an API key, the bearer token must match it (``/health`` stays open);
the body must stay within the size limit (``Content-Length`` first, then the bytes as they
arrive). Only then does a route see the request, with the body read. It counts responses by status
code, and turns an exception that escapes a route into a 500 with OpenAI's error body.
"""

from __future__ import annotations

import hmac
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from starlette.responses import JSONResponse

from omnikv_runtime.errors import ConfigError
from omnikv_runtime.serve.schemas import ApiError

logger = logging.getLogger(__name__)

OPEN_PATHS = ("/health",)  # answered without the API key
STOPPING = "The server is shutting down: retry elsewhere or later"


def api_key_bytes(api_key: str) -> bytes:
    """The key as the bearer token's bytes (UTF-8); ConfigError for a key no request could carry."""
    if not api_key or api_key != api_key.strip() or any(ord(char) < 32 or ord(char) == 127 for char in api_key):
        allowed = "a non-empty key without spaces at either end or control characters (HTTP headers cannot carry them)"
        raise ConfigError("api_key", api_key, allowed)
    return api_key.encode("utf-8")


def error_response(error: ApiError) -> JSONResponse:
    """``error`` as a response: its status and OpenAI's body (with ``WWW-Authenticate`` on a 401)."""
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class Guard:
    """Pure ASGI middleware (see the module docstring). ``stopping()`` says whether the server stops."""

    def __init__(
        self,
        app: Any,
        api_key: str | None,
        max_body_bytes: int,
        counts: Counter,
        stopping: Callable[[], bool],
    ) -> None:
        self.app = app
        self.key = None if api_key is None else api_key_bytes(api_key)
        self.max_body_bytes = max_body_bytes
        self.counts = counts
        self.stopping = stopping

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counting_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                self.counts[message["status"]] += 1
            await send(message)

        try:
            if self.stopping():
                raise ApiError(503, STOPPING, code="server_shutting_down")
            self._authorize(scope)
            receive = await self._read_body(scope, receive)
        except ApiError as error:
            await error_response(error)(scope, receive, counting_send)
            return
        if receive is None:  # the client left while sending its body
            return
        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            logger.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:
                raise
            await error_response(ApiError(500, "internal server error", code="internal_error"))(
                scope, receive, counting_send
            )

    def _authorize(self, scope: dict) -> None:
        """The bearer token's bytes against the key's UTF-8 bytes, in constant time."""
        if self.key is None or scope.get("path") in OPEN_PATHS:
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if not given:
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            raise ApiError(401, "Incorrect API key provided", code="invalid_api_key")

    async def _read_body(self, scope: dict, receive: Any) -> Any:
        """The whole body, read here up to the limit (413 past it), replayed to the app; then the
        connection's own messages (``http.disconnect``). None when the client left first."""
        limit = self.max_body_bytes
        too_large = ApiError(413, f"The request body is over the server's limit of {limit} bytes", code="too_large")
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "Content-Length is not a number", code="invalid_request")
            if len(length.lstrip(b"0")) > len(str(limit)) or int(length) > limit:  # no int() of 5,000 digits
                raise too_large
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> dict:
            return pending.pop() if pending else await receive()

        return replay

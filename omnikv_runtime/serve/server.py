"""The HTTP server around the API: uvicorn with bounded connections and a graceful stop.

:func:`build_server` makes a uvicorn server for an app from
:func:`~omnikv_runtime.serve.app.create_app` (``omnikv serve`` runs it) that

- keeps at most ``max_connections`` connections open: one more closes the connection that has waited
  longest for its next request (idle between requests, or still sending its head); when every one
  carries a request, a request past ``max_connections`` in flight gets 503 ``server_busy``;
- closes a connection whose request head has not fully arrived ``header_timeout`` seconds after the
  connection opened or its first byte came, and one idle for ``keep_alive_timeout`` after a response
  (uvicorn itself starts no timer before the first request: such a connection stayed open forever);
- logs a repeated line (the event loop's accept errors when descriptors run out, uvicorn's warnings) at
  most once every ``REPEAT_INTERVAL_S`` seconds, saying how many were left out;
- stops gracefully: on SIGINT or SIGTERM the listening socket closes and every new request gets 503
  ``server_shutting_down``; running requests get ``grace`` seconds to finish, then each ends with its
  documented error (a whole request 503 ``cancelled``, a stream an error event and ``data: [DONE]``),
  which is written within ``END_WRITE_S`` more seconds before uvicorn cancels what is left.

:func:`raise_descriptor_limit` raises the soft limit on open files to the hard one and checks that the
connections fit in it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from omnikv_runtime.errors import ConfigError
from omnikv_runtime.serve import DEFAULT_HEADER_TIMEOUT_S, DEFAULT_KEEP_ALIVE_S, GRACEFUL_SHUTDOWN_S
from omnikv_runtime.serve.guard import error_response
from omnikv_runtime.serve.schemas import ApiError

logger = logging.getLogger(__name__)

END_WRITE_S = 2.0  # after the grace: time to write the ended requests' errors before uvicorn cancels them
REPEAT_INTERVAL_S = 10.0
REPEAT_LIMITED = ("asyncio", "uvicorn.error", __name__)  # the loggers whose repeated lines are limited
DESCRIPTOR_MARGIN = 64  # descriptors kept for the rest of the process (model files, logs, the listening socket)


class BoundedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for each request head and a cap on connections (uvicorn's
    ``limit_concurrency``); see the module docstring. ``header_timeout`` is set by :func:`build_server`."""

    header_timeout = DEFAULT_HEADER_TIMEOUT_S

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limit, self.limit_concurrency = self.limit_concurrency, None  # checked in _admit, with a JSON 503
        self.app = self._admit
        self.head_timer: asyncio.TimerHandle | None = None
        self.waiting_since = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.waiting_since = self.loop.time()
        self._await_head()
        if self.limit is not None and len(self.connections) > self.limit:
            self._close_longest_waiting()

    def data_received(self, data: bytes) -> None:
        if self.head_timer is None and self.conn.their_state is h11.IDLE:
            self._await_head()  # the first byte of a new request: its head has header_timeout to arrive
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE and self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def on_response_complete(self) -> None:
        self.waiting_since = self.loop.time()
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        super().connection_lost(exc)

    @property
    def waiting(self) -> bool:
        """Waiting for a request: none yet, or the last one answered (idle, or its next head arriving)."""
        return (self.cycle is None or self.cycle.response_complete) and self.conn.their_state is h11.IDLE

    def _await_head(self) -> None:
        self.head_timer = self.loop.call_later(self.header_timeout, self._head_late)

    def _head_late(self) -> None:
        self.head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.debug("closed a connection whose request head did not arrive in %.0f s", self.header_timeout)
            self.transport.close()

    def _close_longest_waiting(self) -> None:
        waiting = [c for c in self.connections if c is not self and isinstance(c, BoundedH11Protocol) and c.waiting]
        if waiting:
            oldest = min(waiting, key=lambda c: c.waiting_since)
            self.connections.discard(oldest)  # at once: its transport closes on the next loop turn
            oldest.transport.close()

    async def _admit(self, scope: dict, receive: Any, send: Any) -> None:
        """The app, or a 503 when more requests than the limit are in flight (this one counted)."""
        in_flight, connections = len(self.tasks), len(self.connections)
        if self.limit is not None and (in_flight > self.limit or connections > self.limit):
            logger.warning(
                "%d requests in flight on %d connections, limit %d: refused", in_flight, connections, self.limit
            )
            message = f"The server holds its limit of {self.limit} connections and requests: retry later"
            await error_response(ApiError(503, message, code="server_busy"))(scope, receive, send)
            return
        await self.config.loaded_app(scope, receive, send)


class RepeatFilter(logging.Filter):
    """Lets a line through at most once every ``interval`` seconds per logger and message (its first line);
    the next one let through says how many were left out."""

    MAX_KEYS = 1000

    def __init__(self, interval: float = REPEAT_INTERVAL_S) -> None:
        super().__init__()
        self.interval = interval
        self.seen: dict[tuple[str, int, str], list[float]] = {}  # key -> [last let through, left out since]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg).split("\n", 1)[0])
        now = time.monotonic()
        entry = self.seen.get(key)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return False
        if entry is None and len(self.seen) >= self.MAX_KEYS:
            self.seen.clear()
        if entry is not None and entry[1]:
            record.msg = f"{record.msg} ({int(entry[1])} more like this in the last {now - entry[0]:.0f} s not logged)"
        self.seen[key] = [now, 0]
        return True


@contextmanager
def repeats_limited(interval: float = REPEAT_INTERVAL_S) -> Iterator[RepeatFilter]:
    """Install a :class:`RepeatFilter` on the loggers of ``REPEAT_LIMITED`` for the block."""
    repeat = RepeatFilter(interval)
    loggers = [logging.getLogger(name) for name in REPEAT_LIMITED]
    for each in loggers:
        each.addFilter(repeat)
    try:
        yield repeat
    finally:
        for each in loggers:
            each.removeFilter(repeat)


def raise_descriptor_limit(max_connections: int | None) -> tuple[int, int] | None:
    """Raise the soft limit on open files to the hard one; ConfigError when ``max_connections`` connections
    cannot fit in it beside what the process holds. Returns (soft, hard), or None where there are no such
    limits (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # macOS refuses an unlimited soft limit: keep what was set
            logger.info("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max_connections is not None and soft != resource.RLIM_INFINITY:
        held = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0
        room = soft - held - DESCRIPTOR_MARGIN
        if max_connections > room:
            raise ConfigError(
                "max_connections",
                max_connections,
                f"at most {max(room, 0)}: this process may open {soft} files (its hard limit, ulimit -Hn), holds "
                f"{held} and keeps {DESCRIPTOR_MARGIN} for itself; lower --max-connections or raise the limit",
            )
    return soft, hard


class DrainingServer(uvicorn.Server):
    """A uvicorn server that stops as the module docstring says; ``api`` is the app's ``app.state.api``."""

    def __init__(self, config: uvicorn.Config, api: Any, grace: float) -> None:
        super().__init__(config)
        self.api = api
        self.grace = grace

    async def serve(self, sockets: Any = None) -> None:
        with repeats_limited():
            await super().serve(sockets)

    async def shutdown(self, sockets: Any = None) -> None:
        self.api.stop_admitting()
        ending = asyncio.get_running_loop().call_later(self.grace, self.api.end_open_requests)
        try:
            await super().shutdown(sockets)
        finally:
            ending.cancel()


def build_server(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_connections: int | None = None,
    header_timeout: float = DEFAULT_HEADER_TIMEOUT_S,
    keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_S,
    grace: float = GRACEFUL_SHUTDOWN_S,
    **uvicorn_options: Any,
) -> DrainingServer:
    """The server of ``app`` (run it with ``.run()``, or ``.run(sockets=[...])`` on sockets already bound)."""
    protocol = type("ServeProtocol", (BoundedH11Protocol,), {"header_timeout": header_timeout})
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=protocol,
        limit_concurrency=max_connections,
        timeout_keep_alive=keep_alive_timeout,
        timeout_graceful_shutdown=grace + END_WRITE_S,
        **uvicorn_options,
    )
    return DrainingServer(config, app.state.api, grace)

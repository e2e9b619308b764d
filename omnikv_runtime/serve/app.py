"""The OpenAI-compatible HTTP API over a :class:`~omnikv_runtime.serve.scheduler.Scheduler`.

``create_app(scheduler, model_name)`` builds a FastAPI application with ``POST /v1/completions``,
``POST /v1/chat/completions`` (whole responses, or server-sent events with ``"stream": true``),
``GET /v1/models``, ``GET /health`` and ``GET /metrics``. Every refusal is a 4xx with OpenAI's error
body. A guard in front of the routes checks the bearer token (when an API key is set; ``/health``
stays open) and the body size (``Content-Length`` first, then the bytes as they arrive) before any
route parses anything. A client that goes away cancels its request, freeing its batch slot.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as exc:  # the serve extra is not installed
    raise ImportError(
        f'omnikv serve needs FastAPI and uvicorn ({exc.name} is missing): pip install "omnikv-runtime[serve]"'
    ) from exc

from omnikv_runtime.serve import DEFAULT_MAX_BODY_BYTES
from omnikv_runtime.serve.metrics import CONTENT_TYPE, render_metrics
from omnikv_runtime.serve.requests import AdmissionError, RequestEvent, ServeRequest
from omnikv_runtime.serve.schemas import ApiError, ChatCompletionRequest, CompletionRequest, parse_body
from omnikv_runtime.serve.sse import STREAM_HEADERS, chat_chunks, completion_chunks

if TYPE_CHECKING:
    from omnikv_runtime.serve.scheduler import Scheduler

logger = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
OPEN_PATHS = ("/health",)  # answered without the API key
# the field an AdmissionError's code points at ("prompt" reads "messages" for chat)
ADMISSION_PARAMS = {
    "context_length_exceeded": "prompt",
    "empty_prompt": "prompt",
    "max_tokens_exceeded": "max_tokens",
    "invalid_max_tokens": "max_tokens",
}
CLIENT_CLOSED = 499  # the status counted for a request whose client left before it finished (as nginx logs it)


class Inbox:
    """A request's events, handed from the scheduler's thread to the event loop; iterate to get them,
    up to and including the one with ``finish_reason``."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[RequestEvent] = asyncio.Queue()
        self.finished = False

    def __call__(self, event: RequestEvent) -> None:  # on the scheduler's thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server stopped, nobody is listening
            pass

    async def __aiter__(self) -> AsyncIterator[RequestEvent]:
        while not self.finished:
            event = await self.queue.get()
            self.finished = event.finish_reason is not None
            yield event


class EventStream(StreamingResponse):
    """A server-sent event stream that cancels its request when it ends early: the client went away
    (Starlette stops the stream when it sees the disconnect, or a send fails) or the server stops."""

    def __init__(self, chunks: AsyncIterator[str], inbox: Inbox, handle: Any) -> None:
        super().__init__(chunks, media_type="text/event-stream", headers=STREAM_HEADERS)
        self.chunks = chunks
        self.inbox = inbox
        self.handle = handle

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        spec = tuple(int(part) for part in scope.get("asgi", {}).get("spec_version", "2.0").split("."))
        watcher = None
        if spec >= (2, 4):  # Starlette then stops the stream only when a send fails: a silent stretch (queued) is
            watcher = asyncio.create_task(_cancel_on_disconnect(receive, self.handle))  # watched here
        try:
            await super().__call__(scope, receive, send)
        finally:
            if watcher is not None:
                watcher.cancel()
            if not self.inbox.finished:
                logger.info("stream of %s ended before the request finished: cancelled", self.handle.request_id)
                self.handle.cancel()
            await self.chunks.aclose()


def _error_response(error: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class Guard:
    """Pure ASGI middleware: API key, body size limit, response counts by status code; an exception
    that escapes a route becomes a 500 with the error body."""

    def __init__(self, app: Any, api_key: str | None, max_body_bytes: int, counts: Counter) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.counts = counts

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
            self._authorize(scope)
            receive = await self._read_body(scope, receive)
        except ApiError as error:
            await _error_response(error)(scope, receive, counting_send)
            return
        if receive is None:  # the client left while sending its body
            return
        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            logger.exception("%s %s failed", scope.get("method"), scope.get("path"))
            if started:
                raise
            await _error_response(ApiError(500, "internal server error", code="internal_error"))(
                scope, receive, counting_send
            )

    def _authorize(self, scope: dict) -> None:
        if self.api_key is None or scope.get("path") in OPEN_PATHS:
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = given.partition(" ")
        if not given:
            raise ApiError(401, "Missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
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
            if int(length) > limit:
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


class Api:
    """The routes' state: the scheduler, the served model's name, response counts."""

    def __init__(self, scheduler: Scheduler, model_name: str, counts: Counter) -> None:
        self.scheduler = scheduler
        self.model_name = model_name
        self.counts = counts
        self.created = int(time.time())

    def check_model(self, body: CompletionRequest | ChatCompletionRequest) -> None:
        if body.model is not None and body.model != self.model_name:
            raise ApiError(
                404,
                f"The model '{body.model}' does not exist: this server serves '{self.model_name}'",
                "model",
                "model_not_found",
            )

    def default_chat_tokens(self, prompt_tokens: int) -> int:
        """A chat request without a token limit may fill the context, up to the scheduler's cap per request."""
        room = self.scheduler.context_limit - prompt_tokens
        cap = getattr(self.scheduler, "max_new_tokens", None)
        return max(1, room if cap is None else min(room, cap))

    def encode(self, text: str, add_special_tokens: bool, param: str) -> tuple[int, ...]:
        encoded = self.scheduler.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        ids = tuple(int(each) for each in encoded)
        if not ids:
            raise ApiError(400, f"'{param}' gives no tokens", param)
        return ids

    def chat_prompt(self, body: ChatCompletionRequest) -> tuple[int, ...]:
        tokenizer = self.scheduler.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "This model's tokenizer has no chat template: use /v1/completions", "messages")
        messages = [message.as_template_message() for message in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template refuses these messages (jinja2's TemplateError, ...)
            raise ApiError(400, f"The chat template refused the messages: {exc}", "messages") from None
        return self.encode(text, add_special_tokens=False, param="messages")

    async def serve(self, request: Request, body: Any, prompt_ids: tuple[int, ...], chat: bool) -> Response:
        if chat:
            limit = body.token_limit()
            max_tokens = limit if limit is not None else self.default_chat_tokens(len(prompt_ids))
        else:
            max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        serve_request = ServeRequest(
            request_id=request_id,
            prompt_ids=prompt_ids,
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop_strings(),
        )
        inbox = Inbox(asyncio.get_running_loop())
        try:
            handle = self.scheduler.submit(serve_request, inbox)
        except AdmissionError as exc:
            param = ADMISSION_PARAMS.get(exc.code)
            if param == "prompt" and chat:
                param = "messages"
            raise ApiError(exc.status, exc.message, param, exc.code) from None
        head = {"id": request_id, "created": int(time.time()), "model": self.model_name}
        if body.stream:
            chunks = chat_chunks if chat else completion_chunks
            return EventStream(chunks(head, inbox, body.include_usage), inbox, handle)
        return await self._whole(request, inbox, handle, head, chat)

    async def _whole(self, request: Request, inbox: Inbox, handle: Any, head: dict, chat: bool) -> Response:
        watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, handle))
        try:
            events = [event async for event in inbox]
        finally:
            client_left = watcher.done() and not watcher.cancelled()
            watcher.cancel()
            if not inbox.finished:  # this task was cancelled (the server is stopping)
                handle.cancel()
        last = events[-1]
        if client_left and last.finish_reason == "cancelled":
            return Response(status_code=CLIENT_CLOSED)  # nobody reads it; counted apart from the server's errors
        if last.finish_reason == "error":
            raise ApiError(500, f"Generation failed: {last.error or 'unknown error'}", code="generation_error")
        if last.finish_reason == "cancelled":
            raise ApiError(503, "The request was cancelled (the server is stopping)", code="cancelled")
        text = "".join(event.text for event in events)
        usage = {
            "prompt_tokens": last.prompt_tokens,
            "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens,
        }
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": last.finish_reason}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        obj = "chat.completion" if chat else "text_completion"
        return JSONResponse({**head, "object": obj, "choices": [choice], "usage": usage})


async def _cancel_on_disconnect(receive: Any, handle: Any) -> None:
    """Wait for the client to go away (its body is read: the next message is the disconnect); cancel."""
    while (await receive())["type"] != "http.disconnect":
        pass
    logger.info("client left before %s finished: cancelled", handle.request_id)
    handle.cancel()


def create_app(
    scheduler: Scheduler,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    manage_scheduler: bool = True,
) -> FastAPI:
    """The application. With ``manage_scheduler`` its lifespan starts the scheduler and shuts it down."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_scheduler:
            scheduler.start()
        try:
            yield
        finally:
            if manage_scheduler:
                scheduler.shutdown()

    counts: Counter = Counter()
    api = Api(scheduler, model_name, counts)
    app = FastAPI(title="omnikv-runtime", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = api
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes, counts=counts)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message, code = f"Unknown route: {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), None
        return _error_response(ApiError(exc.status_code, message, code=code))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": api.model_name, "object": "model", "created": api.created, "owned_by": "omnikv-runtime"}
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(scheduler.metrics(), counts), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_body(await request.body(), CompletionRequest)
        api.check_model(body)
        ids = api.encode(body.prompt_text(), add_special_tokens=True, param="prompt")
        return await api.serve(request, body, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_body(await request.body(), ChatCompletionRequest)
        api.check_model(body)
        return await api.serve(request, body, api.chat_prompt(body), chat=True)

    return app

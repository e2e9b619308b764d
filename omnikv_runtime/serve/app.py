"""The OpenAI-compatible HTTP API over a :class:`~omnikv_runtime.serve.scheduler.Scheduler`.

``create_app(scheduler, model_name)`` builds a FastAPI application with ``POST /v1/completions``,
``POST /v1/chat/completions`` (whole responses, or server-sent events with ``"stream": true``),
``GET /v1/models``, ``GET``/``HEAD /health`` and ``GET /metrics``. Every refusal is a 4xx with
OpenAI's error body. A :class:`~omnikv_runtime.serve.guard.Guard` in front of the routes checks the
bearer token and the body size before any route parses anything. The body is parsed, rendered and
tokenized on a worker thread (:mod:`~omnikv_runtime.serve.prompts`), never on the event loop. A
client that goes away cancels its request, freeing its batch slot.

To stop (see :mod:`omnikv_runtime.serve.server`), ``app.state.api.stop_admitting()`` refuses every
new request with 503; ``app.state.api.end_open_requests()`` then ends those still running with
their documented error.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
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
from omnikv_runtime.serve.guard import STOPPING, Guard, error_response
from omnikv_runtime.serve.metrics import CONTENT_TYPE, render_metrics
from omnikv_runtime.serve.prompts import PromptEncoder, PromptWorker
from omnikv_runtime.serve.requests import AdmissionError, RequestEvent, ServeRequest
from omnikv_runtime.serve.schemas import ApiError, ChatCompletionRequest, CompletionRequest, parse_body
from omnikv_runtime.serve.sse import STREAM_HEADERS, chat_chunks, completion_chunks

if TYPE_CHECKING:
    from omnikv_runtime.serve.scheduler import Scheduler

logger = logging.getLogger(__name__)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
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
        self.handle: Any = None  # the scheduler's handle, once submitted

    def __call__(self, event: RequestEvent) -> None:  # on the scheduler's thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server stopped, nobody is listening
            pass

    def end(self) -> None:
        """End the request now (on the event loop): it reads as cancelled after what was already
        delivered, and the scheduler drops it."""
        self.handle.cancel()
        self.queue.put_nowait(RequestEvent("", [], "cancelled"))

    async def __aiter__(self) -> AsyncIterator[RequestEvent]:
        while not self.finished:
            event = await self.queue.get()
            self.finished = event.finish_reason is not None
            yield event


class EventStream(StreamingResponse):
    """A server-sent event stream that cancels its request when it ends early: the client went away
    (Starlette stops the stream when it sees the disconnect, or a send fails) or the server stops."""

    def __init__(self, chunks: AsyncIterator[str], inbox: Inbox, closed: Callable[[Inbox], None]) -> None:
        super().__init__(chunks, media_type="text/event-stream", headers=STREAM_HEADERS)
        self.chunks = chunks
        self.inbox = inbox
        self.closed = closed

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        spec = tuple(int(part) for part in scope.get("asgi", {}).get("spec_version", "2.0").split("."))
        watcher = None
        if spec >= (2, 4):  # Starlette then stops the stream only when a send fails: a silent stretch (queued) is
            watcher = asyncio.create_task(_cancel_on_disconnect(receive, self.inbox.handle))  # watched here
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.closed(self.inbox)
            if watcher is not None:
                watcher.cancel()
            if not self.inbox.finished:
                logger.info("stream of %s ended before the request finished: cancelled", self.inbox.handle.request_id)
                self.inbox.handle.cancel()
            await self.chunks.aclose()


@dataclass
class Prepared:
    """A request body, checked, with its prompt's token ids and its token limit."""

    body: CompletionRequest | ChatCompletionRequest
    prompt_ids: tuple[int, ...]
    max_tokens: int


class Api:
    """The routes' state: the scheduler, the served model's name, response counts, the requests open."""

    def __init__(self, scheduler: Scheduler, model_name: str, counts: Counter) -> None:
        self.scheduler = scheduler
        self.model_name = model_name
        self.counts = counts
        self.created = int(time.time())
        self.encoder = PromptEncoder(scheduler.tokenizer, scheduler.context_limit)
        self.worker = PromptWorker()
        self.stopping = False
        self.open: set[Inbox] = set()

    # shutting down (on the event loop) ----------------------------------------------------------------
    def stop_admitting(self) -> None:
        """Every new request gets 503 ``server_shutting_down`` from now on; those running go on."""
        self.stopping = True

    def end_open_requests(self) -> None:
        """End every running request now with its documented error: a whole request gets 503 ``cancelled``,
        a stream an error event and ``[DONE]``."""
        if self.open:
            logger.warning("ending %d requests still running: the server is stopping", len(self.open))
        for inbox in list(self.open):
            inbox.end()

    # a request -------------------------------------------------------------------------------------------
    def prepare(self, raw: bytes, chat: bool) -> Prepared:
        """The body checked, rendered and tokenized (on the worker thread: this grows with the body)."""
        if chat:
            body = parse_body(raw, ChatCompletionRequest, max_messages=self.encoder.room(None))
        else:
            body = parse_body(raw, CompletionRequest)
        if body.model is not None and body.model != self.model_name:
            message = f"The model '{body.model}' does not exist: this server serves '{self.model_name}'"
            raise ApiError(404, message, "model", "model_not_found")
        if chat:
            limit = body.token_limit()
            self._check_max_tokens(limit, chat)
            ids = self.chat_prompt(body, limit)
            max_tokens = limit if limit is not None else self.default_chat_tokens(len(ids))
        else:
            max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETION_DEFAULT_MAX_TOKENS
            self._check_max_tokens(max_tokens, chat)
            ids = self.encoder.encode(body.prompt_text(), True, max_tokens, "prompt")
        return Prepared(body, ids, max_tokens)

    def _check_max_tokens(self, max_tokens: int | None, chat: bool) -> None:
        """The scheduler's admission check of ``max_tokens`` alone, before the prompt is tokenized."""
        if max_tokens is None:
            return
        try:
            self.scheduler.check(None, max_tokens)
        except AdmissionError as exc:
            raise _admission_error(exc, chat) from None

    def default_chat_tokens(self, prompt_tokens: int) -> int:
        """A chat request without a token limit may fill the context, up to the scheduler's cap per request."""
        room = self.scheduler.context_limit - prompt_tokens
        cap = getattr(self.scheduler, "max_new_tokens", None)
        return max(1, room if cap is None else min(room, cap))

    def chat_prompt(self, body: ChatCompletionRequest, max_tokens: int | None) -> tuple[int, ...]:
        tokenizer = self.scheduler.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            message = "This model's tokenizer has no chat template: use /v1/completions"
            raise ApiError(400, message, "messages", "unsupported_value")
        messages = [message.as_template_message() for message in body.messages]
        self.encoder.check_chars([m["content"] for m in messages], max_tokens, "messages")
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # the template refuses these messages (jinja2's TemplateError, ...)
            raise ApiError(400, f"The chat template refused the messages: {exc}", "messages", "invalid_value") from None
        return self.encoder.encode(text, False, max_tokens, "messages")

    async def serve(self, request: Request, chat: bool) -> Response:
        prepared = await self.worker.run(self.prepare, await request.body(), chat)
        if self.stopping:  # it arrived before the server began to stop, and was being prepared since
            raise ApiError(503, STOPPING, code="server_shutting_down")
        body = prepared.body
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        serve_request = ServeRequest(
            request_id=request_id,
            prompt_ids=prepared.prompt_ids,
            max_tokens=prepared.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            seed=body.seed,
            stop=body.stop_strings(),
        )
        inbox = Inbox(asyncio.get_running_loop())
        try:
            inbox.handle = self.scheduler.submit(serve_request, inbox)
        except AdmissionError as exc:
            raise _admission_error(exc, chat) from None
        self.open.add(inbox)
        head = {"id": request_id, "created": int(time.time()), "model": self.model_name}
        if body.stream:
            chunks = chat_chunks if chat else completion_chunks
            return EventStream(chunks(head, inbox, body.include_usage), inbox, self.open.discard)
        try:
            return await self._whole(request, inbox, head, chat)
        finally:
            self.open.discard(inbox)

    async def _whole(self, request: Request, inbox: Inbox, head: dict, chat: bool) -> Response:
        watcher = asyncio.create_task(_cancel_on_disconnect(request.receive, inbox.handle))
        try:
            events = [event async for event in inbox]
        finally:
            client_left = watcher.done() and not watcher.cancelled()
            watcher.cancel()
            if not inbox.finished:  # this task was cancelled (the server is stopping)
                inbox.handle.cancel()
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


def _admission_error(exc: AdmissionError, chat: bool) -> ApiError:
    param = ADMISSION_PARAMS.get(exc.code)
    return ApiError(exc.status, exc.message, "messages" if param == "prompt" and chat else param, exc.code)


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
    """The application. With ``manage_scheduler`` its lifespan starts the scheduler and shuts it down.
    An ``api_key`` no request could carry (spaces at either end, control characters) raises ConfigError."""
    counts: Counter = Counter()
    api = Api(scheduler, model_name, counts)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if manage_scheduler:
            scheduler.start()
        try:
            yield
        finally:
            api.worker.close()
            if manage_scheduler:
                scheduler.shutdown()

    app = FastAPI(title="omnikv-runtime", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.api = api
    app.add_middleware(
        Guard, api_key=api_key, max_body_bytes=max_body_bytes, counts=counts, stopping=lambda: api.stopping
    )

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message, code = f"Unknown route: {request.method} {request.url.path}", "not_found"
        elif exc.status_code == 405:
            message, code = f"{request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            message, code = str(exc.detail), "invalid_request"
        return error_response(ApiError(exc.status_code, message, code=code))

    @app.api_route("/health", methods=["GET", "HEAD"])
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
        return await api.serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await api.serve(request, chat=True)

    return app

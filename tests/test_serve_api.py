"""The HTTP layer of ``omnikv serve`` over a fake scheduler (tests/serve_testlib.py): request and response
bodies, every refusal with its status and OpenAI error body, the API key, the body size limit,
server-sent event framing, the metrics text, and cancellation when a client goes away."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from serve_testlib import FakeScheduler, parse_exposition  # noqa: E402

from omnikv_runtime.cli.serve import exposure_warning  # noqa: E402
from omnikv_runtime.serve.app import create_app  # noqa: E402

MODEL = "fake-model"
PROMPT = {"model": MODEL, "prompt": "hello", "max_tokens": 3}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture
def scheduler() -> FakeScheduler:
    return FakeScheduler(context_limit=64)


@pytest.fixture
def client(scheduler):
    with TestClient(create_app(scheduler, MODEL, max_body_bytes=4096)) as test_client:
        yield test_client


def error_of(response, status: int, param: str | None = None, code: str | None = None) -> str:
    """The error message of `response`, after checking its status and OpenAI's error body shape (a code
    always; `code` when given)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param
    assert isinstance(error["code"], str) and error["code"]
    if code is not None:
        assert error["code"] == code
    return error["message"]


def events_of(text: str) -> list[str]:
    """The data of each server-sent event; checks the framing (``data: ...`` then a blank line)."""
    assert text.endswith("\n\n")
    blocks = text[:-2].split("\n\n")
    assert all(block.startswith("data: ") and "\n" not in block for block in blocks), blocks
    return [block[len("data: ") :] for block in blocks]


def test_lifespan_starts_and_stops_the_scheduler(scheduler):
    with TestClient(create_app(scheduler, MODEL)) as test_client:
        assert scheduler.started and not scheduler.stopped
        assert test_client.get("/health").json() == {"status": "ok"}
    assert scheduler.stopped


def test_completion_whole(client, scheduler):
    body = client.post("/v1/completions", json={**PROMPT, "stop": ["x"], "seed": 5, "temperature": 0}).json()
    assert body["object"] == "text_completion" and body["model"] == MODEL and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "w0 w1 w2 ", "logprobs": None, "finish_reason": "length"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    request = scheduler.requests[-1]
    assert request.prompt_ids == tuple(ord(c) for c in "hello") and request.max_tokens == 3
    assert (request.stop, request.seed, request.temperature, request.request_id) == (("x",), 5, 0.0, body["id"])


def test_chat_whole_renders_the_template(client, scheduler):
    parts = [{"type": "text", "text": "hi"}]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}]
    body = client.post("/v1/chat/completions", json={"messages": messages, "max_completion_tokens": 2}).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "w0 w1 "}
    prompt = "<system>be brief\n<user>hi\n<assistant>"
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 2, "total_tokens": len(prompt) + 2}
    assert scheduler.requests[-1].prompt_ids == tuple(ord(c) for c in prompt)


def test_defaults_for_max_tokens(client, scheduler):
    client.post("/v1/completions", json={"prompt": "a"})
    assert scheduler.requests[-1].max_tokens == 16  # OpenAI's completions default
    chat = {"messages": [{"role": "user", "content": "a"}]}
    client.post("/v1/chat/completions", json=chat)
    prompt_tokens = len("<user>a\n<assistant>")
    assert scheduler.requests[-1].max_tokens == 64 - prompt_tokens  # the rest of the context
    scheduler.max_new_tokens = 5
    client.post("/v1/chat/completions", json=chat)
    assert scheduler.requests[-1].max_tokens == 5  # up to the scheduler's cap per request
    error_of(client.post("/v1/completions", json={**PROMPT, "max_tokens": 6}), 400, "max_tokens", "max_tokens_exceeded")


def test_completion_stream_framing_and_usage(client):
    with client.stream("POST", "/v1/completions", json={**PROMPT, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = response.read().decode()
    data = events_of(text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(each) for each in data[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "w0 w1 w2 "
    assert [chunk["choices"][0]["finish_reason"] for chunk in chunks] == [None, None, None, "length"]
    assert "usage" not in chunks[0]
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def test_chat_stream_with_include_usage(client):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        data = events_of(response.read().decode())
    assert data[-1] == "[DONE]"
    chunks = [json.loads(each) for each in data[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "w0 w1 w2 "
    assert chunks[-2]["choices"][0]["delta"] == {} and chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(chunk["usage"] is None for chunk in chunks[:-1])  # as OpenAI: null until the last chunk
    prompt_tokens = len("<user>hi\n<assistant>")
    assert chunks[-1]["choices"] == []
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": 3, "total_tokens": prompt_tokens + 3}
    assert chunks[-1]["usage"] == usage
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}


BAD_BODIES = [
    pytest.param({**PROMPT, "max_tokens": 0}, "max_tokens", "invalid_value", id="max_tokens=0"),
    pytest.param({**PROMPT, "max_tokens": -3}, "max_tokens", "invalid_value", id="max_tokens<0"),
    pytest.param({**PROMPT, "max_tokens": "8"}, "max_tokens", "invalid_value", id="max_tokens-string"),
    pytest.param({**PROMPT, "temperature": 3}, "temperature", "invalid_value", id="temperature"),
    pytest.param({**PROMPT, "top_p": 0}, "top_p", "invalid_value", id="top_p"),
    pytest.param({**PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value", id="5-stops"),
    pytest.param({**PROMPT, "stop": 7}, "stop", "invalid_value", id="stop-number"),
    pytest.param({**PROMPT, "seed": 2**64}, "seed", "invalid_value", id="seed-too-big"),
    pytest.param({**PROMPT, "prompt": ["a", "b"]}, "prompt", "invalid_value", id="two-prompts"),
    pytest.param({**PROMPT, "prompt": ""}, "prompt", "empty_prompt", id="empty-prompt"),
    pytest.param({"max_tokens": 3}, "prompt", "missing_required_parameter", id="no-prompt"),
    pytest.param({**PROMPT, "best_of": 2}, "best_of", "unsupported_value", id="best_of=2"),
    pytest.param({**PROMPT, "n": 2}, "n", "unsupported_value", id="n=2"),
    pytest.param({**PROMPT, "logprobs": 1}, "logprobs", "unsupported_value", id="logprobs=1"),
    pytest.param({**PROMPT, "frequency_penalty": 0.5}, "frequency_penalty", "unsupported_value", id="penalty"),
    pytest.param({**PROMPT, "echo": True}, "echo", "unsupported_value", id="echo"),
    pytest.param(
        {**PROMPT, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value", id="options-no-stream"
    ),
    pytest.param({**PROMPT, "stream": True, "stream_options": {"x": 1}}, "stream_options.x", "unknown_parameter"),
]


@pytest.mark.parametrize("body, param, code", BAD_BODIES)
def test_bad_completion_bodies_are_400_naming_the_field(client, scheduler, body, param, code):
    error_of(client.post("/v1/completions", json=body), 400, param, code)
    assert scheduler.requests == []  # nothing reached the scheduler


def test_unknown_field_is_named(client):
    message = error_of(client.post("/v1/completions", json={**PROMPT, "best_off": 1}), 400, "best_off")
    assert message == "Unrecognized request argument supplied: best_off"
    bad = {**CHAT, "messages": [{"role": "user", "content": "x", "tool_calls": []}]}
    error_of(client.post("/v1/chat/completions", json=bad), 400, "messages[0].tool_calls", "unknown_parameter")


@pytest.mark.parametrize(
    "body, param",
    [
        ({**CHAT, "messages": []}, "messages"),
        ({**CHAT, "messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({**CHAT, "logprobs": True}, "logprobs"),
        ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
        ({**CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
        ({**CHAT, "max_completion_tokens": 4}, "max_tokens"),  # both, disagreeing
        ({**CHAT, "presence_penalty": 1}, "presence_penalty"),
    ],
)
def test_bad_chat_bodies_are_400(client, body, param):
    error_of(client.post("/v1/chat/completions", json=body), 400, param)


def test_common_openai_fields_at_their_defaults_are_accepted(client, scheduler):
    ignored = {"n": 1, "user": "u1", "frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": None}
    assert client.post("/v1/completions", json={**PROMPT, **ignored, "echo": False, "best_of": 1}).status_code == 200
    chat = {**CHAT, **ignored, "logprobs": False, "logit_bias": {}, "max_completion_tokens": 3}
    assert client.post("/v1/chat/completions", json=chat).status_code == 200
    assert len(scheduler.requests) == 2


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_json_is_400(client, raw):
    response = client.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
    error_of(response, 400, None, "invalid_json")


def test_context_limit_and_full_queue_come_from_admission(client, scheduler):
    long_prompt = {**PROMPT, "prompt": "x" * 62}
    message = error_of(client.post("/v1/completions", json=long_prompt), 400, "prompt", "context_length_exceeded")
    assert "62 prompt tokens" in message
    chat = {**CHAT, "messages": [{"role": "user", "content": "x" * 60}]}
    error_of(client.post("/v1/chat/completions", json=chat), 400, "messages", "context_length_exceeded")
    scheduler.queue_full = True
    response = client.post("/v1/completions", json=PROMPT)
    error_of(response, 429, None, "queue_full")
    assert response.json()["error"]["type"] == "rate_limit_error"
    scheduler.queue_full = False
    assert client.post("/v1/completions", json=PROMPT).status_code == 200  # still serving


def test_unknown_route_method_and_model(client):
    error_of(client.get("/v1/nothing"), 404, None, "not_found")
    error_of(client.get("/v1/completions"), 405, None, "method_not_allowed")
    message = error_of(client.post("/v1/completions", json={**PROMPT, "model": "gpt-4"}), 404, "model")
    assert "fake-model" in message
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL


def test_generation_error_whole_and_streamed():
    with TestClient(create_app(FakeScheduler(finish="error"), MODEL)) as client:
        message = error_of(client.post("/v1/completions", json=PROMPT), 500, None, "generation_error")
        assert "the fake failed" in message
        with client.stream("POST", "/v1/completions", json={**PROMPT, "stream": True}) as response:
            data = events_of(response.read().decode())
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "generation_error"
    assert [json.loads(each)["choices"][0]["text"] for each in data[:-2]] == ["w0 ", "w1 "]


def test_api_key():
    scheduler = FakeScheduler()
    with TestClient(create_app(scheduler, MODEL, api_key="s3cret")) as client:
        response = client.post("/v1/completions", json=PROMPT)
        error_of(response, 401, None, "missing_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
        for header in ("Bearer wrong", "Basic s3cret", "Bearer s3cret2", "s3cret"):
            error_of(client.get("/v1/models", headers={"Authorization": header}), 401, None, "invalid_api_key")
        error_of(client.get("/metrics"), 401)
        error_of(client.get("/v1/nothing"), 401)  # the key before the route: no probing without it
        assert scheduler.requests == []
        assert client.get("/health").status_code == 200  # open for load balancers
        good = client.post("/v1/completions", json=PROMPT, headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200 and good.json()["choices"][0]["text"] == "w0 w1 w2 "


def test_body_limit_by_content_length_and_by_bytes_streamed(client, scheduler):
    big = json.dumps({**PROMPT, "prompt": "x" * 5000}).encode()
    response = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert "4096 bytes" in error_of(response, 413, None, "too_large")

    def chunked():  # no Content-Length: the body is counted as it arrives
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    response = client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    error_of(response, 413, None, "too_large")
    lying = client.post("/v1/completions", content=chunked(), headers={"content-length": "100"})
    assert lying.status_code in (400, 413)  # h11 refuses the mismatch, or the guard counts past the limit
    assert scheduler.requests == []
    fits = json.dumps({**PROMPT, "prompt": "x" * 3900}).encode()
    assert len(fits) <= 4096
    response = client.post("/v1/completions", content=fits, headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "context_length_exceeded"  # parsed


def test_metrics_text_parses_and_carries_the_scheduler_metrics(client, scheduler):
    client.post("/v1/completions", json=PROMPT)
    client.post("/v1/completions", json={**PROMPT, "n": 3})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_exposition(response.text)
    expected = scheduler.metrics()
    for key in ("requests_total", "queue_depth", "batch_size", "slots_free", "prompt_tokens_total", "pcie_bytes_total"):
        assert samples[f"omnikv_{key}"] == expected[key], key
    assert samples["omnikv_generation_tokens_total"] == 7
    for tier, value in expected["kv_bytes"].items():
        assert samples[f'omnikv_kv_bytes{{tier="{tier}"}}'] == value
    assert samples['omnikv_http_responses_total{code="200"}'] == 1
    assert samples['omnikv_http_responses_total{code="400"}'] == 1


async def _drive(app, body: dict, disconnect_after: int) -> tuple[list[dict], FakeScheduler]:
    """Call the ASGI app as uvicorn does; the client goes away after `disconnect_after` body messages."""
    raw = json.dumps(body).encode()
    inbound = [{"type": "http.request", "body": raw, "more_body": False}]
    gone = asyncio.Event()
    sent: list[dict] = []

    async def receive() -> dict:
        if inbound:
            return inbound.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if sum(m["type"] == "http.response.body" for m in sent) >= disconnect_after:
            gone.set()

    path = "/v1/completions"
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1"}
    scope |= {"method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b""}
    scope |= {"root_path": "", "headers": headers, "client": ("127.0.0.1", 5), "server": ("127.0.0.1", 80)}
    if disconnect_after == 0:
        gone.set()
    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    return sent


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
def test_a_client_that_leaves_cancels_its_request(stream):
    scheduler = FakeScheduler(hold=True)  # each request stops after its first token until cancelled
    app = create_app(scheduler, MODEL, manage_scheduler=False)
    body = {**PROMPT, "max_tokens": 50, "stream": stream}
    sent = asyncio.run(_drive(app, body, disconnect_after=1 if stream else 0))
    (handle,) = scheduler.handles
    assert handle.cancelled.is_set()
    scheduler.threads[0].join(timeout=5)
    assert not scheduler.threads[0].is_alive()
    if stream:  # the first token went out, then nothing: the stream stopped when the client left
        chunks = [m["body"] for m in sent if m["type"] == "http.response.body" and m.get("body")]
        assert b"w0 " in chunks[0] and b"w1 " not in b"".join(chunks)
    else:  # nobody reads the answer; it is counted as a client that left, not as a server error
        assert sent[0]["status"] == 499


def test_served_without_fastapi_says_how_to_install_it():
    code = "import sys\nsys.modules['fastapi'] = None\n"
    code += "try:\n import omnikv_runtime.serve.app\nexcept ImportError as e:\n print(e)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert 'pip install "omnikv-runtime[serve]"' in done.stdout, done.stdout + done.stderr


def test_serve_help_imports_no_server_or_model_library():
    code = (
        "import sys, contextlib, io\nfrom omnikv_runtime.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        " try: main(['serve', '--help'])\n except SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'fastapi', 'uvicorn', 'starlette') if m in sys.modules))\n"
        "print('--api-key' in out.getvalue() and '--max-batch' in out.getvalue())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.split("\n")[:2] == ["[]", "True"], done.stdout + done.stderr


@pytest.mark.parametrize(
    "host, key, warns",
    [("127.0.0.1", None, False), ("localhost", None, False), ("0.0.0.0", None, True), ("0.0.0.0", "k", False)],
)
def test_binding_beyond_loopback_without_a_key_warns(host, key, warns):
    assert (exposure_warning(host, key) is not None) == warns


def test_omnikv_serve_wires_config_scheduler_and_server(monkeypatch, caplog):
    """The command as run: config, engine, a Scheduler with the flags, the app, the server on the host and
    port with the connection flags; the key from the environment; the warning for a non-loopback bind
    (here with no key)."""
    import omnikv_runtime.cli.threads
    import omnikv_runtime.engine
    import omnikv_runtime.serve.scheduler
    from omnikv_runtime import cli
    from omnikv_runtime.serve.server import DrainingServer

    built, ran = {}, {}
    engine = object()

    def scheduler(engine_arg, **kwargs):
        built.update(kwargs, engine=engine_arg)
        return FakeScheduler()

    monkeypatch.setattr(omnikv_runtime.cli.threads, "apply_cpu_threads", lambda *a: None)
    monkeypatch.setattr(omnikv_runtime.engine, "initialize", lambda config: engine)
    monkeypatch.setattr(omnikv_runtime.serve.scheduler, "Scheduler", scheduler)
    monkeypatch.setattr(DrainingServer, "run", lambda server: ran.update(server=server, app=server.config.app))
    monkeypatch.setenv("OMNIKV_API_KEY", "from-env")
    argv = ["serve", "--config", "configs/default.json", "--port", "8123", "--max-batch", "3", "--max-queue", "5"]
    limits = ["--max-connections", "40", "--header-timeout", "2.5", "--keep-alive-timeout", "3"]
    assert (
        cli.main([*argv, "--max-context", "300", *limits, "--prefix-cache-bytes", "4096", "--max-prefill-tokens", "96"])
        == 0
    )
    assert built == {
        "engine": engine,
        "max_batch": 3,
        "max_queue": 5,
        "max_context": 300,
        "prefix_cache_bytes": 4096,
        "max_prefill_tokens": 96,
    }
    config = ran["server"].config
    assert (config.host, config.port, config.limit_concurrency, config.timeout_keep_alive) == ("127.0.0.1", 8123, 40, 3)
    assert config.http.header_timeout == 2.5 and ran["server"].grace == 10
    with TestClient(ran["app"]) as client:
        error_of(client.get("/v1/models"), 401, None, "missing_api_key")
        models = client.get("/v1/models", headers={"Authorization": "Bearer from-env"}).json()
        assert models["data"][0]["id"] == "smollm2-135m"
    assert "without an API key" not in caplog.text
    monkeypatch.delenv("OMNIKV_API_KEY")
    with caplog.at_level(logging.WARNING, logger="omnikv_runtime.cli.serve"):
        assert cli.main([*argv, "--host", "0.0.0.0"]) == 0
    assert "serving on 0.0.0.0 without an API key" in caplog.text
    assert ran["server"].config.host == "0.0.0.0" and built["max_context"] is None
    assert built["prefix_cache_bytes"] == 0
    assert built["max_prefill_tokens"] is None  # the scheduler's default: prefill.chunk_size
    assert ran["server"].config.limit_concurrency == 512


def test_an_interrupt_after_the_graceful_shutdown_ends_omnikv_serve_quietly(monkeypatch, caplog):
    """uvicorn stops gracefully on Ctrl-C and then raises the interrupt again: the command ends with 0, the
    scheduler stopped, and one line in the log instead of a traceback."""
    import omnikv_runtime.cli.threads
    import omnikv_runtime.engine
    import omnikv_runtime.serve.scheduler
    from omnikv_runtime import cli
    from omnikv_runtime.serve.server import DrainingServer

    schedulers = []

    def interrupted(server):
        raise KeyboardInterrupt

    monkeypatch.setattr(omnikv_runtime.cli.threads, "apply_cpu_threads", lambda *a: None)
    monkeypatch.setattr(omnikv_runtime.engine, "initialize", lambda config: object())
    monkeypatch.setattr(
        omnikv_runtime.serve.scheduler,
        "Scheduler",
        lambda engine, **kwargs: schedulers.append(FakeScheduler()) or schedulers[-1],
    )
    monkeypatch.setattr(DrainingServer, "run", interrupted)
    with caplog.at_level(logging.INFO, logger="omnikv_runtime.cli.serve"):
        assert cli.main(["serve", "--config", "configs/default.json", "--max-batch", "1"]) == 0
    assert schedulers[0].stopped
    assert "stopped by an interrupt" in caplog.text

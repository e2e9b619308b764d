"""``omnikv serve`` against hostile clients and at shutdown, over the fake scheduler of tests/serve_testlib.py:
bad input that must be a 400 (never a 500), tokenizing kept off the event loop, the API key as bytes,
connection limits and timeouts, a slow-header flood, running out of descriptors, and a graceful stop.

Servers are live (uvicorn on a loopback port, built as ``omnikv serve`` builds them), in a thread of this
process, or in a process of their own where signals, descriptor limits or the log must be the server's
own. Limits and timeouts are small, so each test takes seconds.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest

pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from serve_testlib import CharTokenizer, FakeScheduler, live_server, spawned_server  # noqa: E402

from omnikv_runtime import cli  # noqa: E402
from omnikv_runtime.errors import ConfigError  # noqa: E402
from omnikv_runtime.serve.app import create_app  # noqa: E402
from omnikv_runtime.serve.guard import api_key_bytes  # noqa: E402
from omnikv_runtime.serve.server import END_WRITE_S, raise_descriptor_limit  # noqa: E402

MODEL = "fake-model"
PROMPT = {"prompt": "hello", "max_tokens": 3}
JSON = {"content-type": "application/json"}


def refusal(response: httpx.Response, status: int = 400) -> dict:
    """The error body of a refusal, after checking its status and that it has a code."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"], error
    return error


# 1. bad client input is a 400 with a code, naming the field -----------------------------------------------
HOSTILE = [
    pytest.param(
        "/v1/completions",
        b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}",
        ("max_tokens", "invalid_value", "(an integer of 5000 digits)"),
        id="5000-digit-integer",
    ),
    pytest.param(
        "/v1/completions",
        b'{"prompt": "hi", "stop": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        (None, "invalid_json", "nests arrays or objects too deeply"),
        id="nested-2000-deep",
    ),
    pytest.param(
        "/v1/completions",
        b'{"prompt": "ab\\ud800cd", "max_tokens": 1}',
        ("prompt", "invalid_value", "'prompt' holds a lone surrogate (\\ud800 at character 2)"),
        id="surrogate-prompt",
    ),
    pytest.param(
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
        ("messages[0].content", "invalid_value", "lone surrogate (\\ud800 at character 0)"),
        id="surrogate-chat-content",
    ),
    pytest.param(
        "/v1/completions",
        b'{"prompt": "hi", "model": "\\udcff"}',
        ("model", "invalid_value", "'model' holds a lone surrogate (\\udcff"),
        id="surrogate-model",
    ),
    pytest.param(
        "/v1/completions",
        b'{"prompt": "hi", "\\ud800": 1}',
        (None, "invalid_value", "A field name holds a lone surrogate"),
        id="surrogate-field-name",
    ),
]


@pytest.fixture(scope="module")
def fake_server():
    scheduler = FakeScheduler(context_limit=64)
    with live_server(create_app(scheduler, MODEL)) as (_, url):
        yield scheduler, url


@pytest.mark.parametrize("path, raw, expected", HOSTILE)
def test_hostile_bodies_are_400_naming_the_field(fake_server, path, raw, expected):
    scheduler, url = fake_server
    before = len(scheduler.requests)
    error = refusal(httpx.post(url + path, content=raw, headers=JSON))
    param, code, words = expected
    assert (error["param"], error["code"]) == (param, code)
    assert words in error["message"]
    assert len(scheduler.requests) == before  # nothing reached the scheduler
    assert httpx.post(url + "/v1/completions", json=PROMPT).status_code == 200  # and the server goes on


# 8. every 400 has a code; HEAD /health ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, param, code",
    [
        ({**PROMPT, "stop": [""]}, "stop", "invalid_value"),
        ({**PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop", "invalid_value"),
        ({**PROMPT, "prompt": ""}, "prompt", "empty_prompt"),
        ({**PROMPT, "prompt": ["a", "b"]}, "prompt", "invalid_value"),
        ({**PROMPT, "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ],
    ids=["empty-stop", "5-stops", "empty-prompt", "two-prompts", "stream_options-without-stream"],
)
def test_every_400_has_a_code(fake_server, body, param, code):
    error = refusal(httpx.post(fake_server[1] + "/v1/completions", json=body))
    assert (error["param"], error["code"]) == (param, code)


def test_the_chat_400s_have_codes_too(fake_server):
    url = fake_server[1] + "/v1/chat/completions"
    messages = [{"role": "user", "content": "hi"}]
    both = {"messages": messages, "max_tokens": 3, "max_completion_tokens": 4}
    assert refusal(httpx.post(url, json=both))["code"] == "invalid_value"
    scheduler = FakeScheduler()
    scheduler.tokenizer.chat_template = None  # no chat template: refused, with a code
    with TestClient(create_app(scheduler, MODEL)) as client:
        response = client.post("/v1/chat/completions", json={"messages": messages})
    assert refusal(response)["code"] == "unsupported_value"


def test_head_health_is_answered(fake_server):
    response = httpx.head(fake_server[1] + "/health")
    assert response.status_code == 200 and response.content == b""


# 5. an API key that is not ASCII -----------------------------------------------------------------------------
def test_a_non_ascii_api_key_authenticates_as_utf8_bytes():
    with live_server(create_app(FakeScheduler(), MODEL, api_key="ключ-123")) as (_, url):
        good = httpx.post(url + "/v1/completions", json=PROMPT, headers={"Authorization": "Bearer ключ-123".encode()})
        assert good.status_code == 200, good.text
        wrong = httpx.post(url + "/v1/completions", json=PROMPT, headers={"Authorization": "Bearer ключ-124".encode()})
        assert refusal(wrong, 401)["code"] == "invalid_api_key"
    for key in (" key", "key\n", "", "a\x00b"):
        with pytest.raises(ConfigError, match="api_key"):
            api_key_bytes(key)


@pytest.fixture
def no_model(monkeypatch):
    """``omnikv serve`` fails the test if it gets as far as loading a config (and a model)."""
    import omnikv_runtime.config

    def load_config(*args, **kwargs):
        raise AssertionError("the command went on to load the model")

    monkeypatch.setattr(omnikv_runtime.config, "load_config", load_config)


def test_a_key_no_request_can_carry_is_refused_before_the_model_loads(capsys, no_model):
    assert cli.main(["serve", "--api-key", "key "]) == 2
    assert "api_key" in capsys.readouterr().err


# 4. tokenizing: a cheap bound first, then off the event loop, stopping early ----------------------------------
class RecordingTokenizer(CharTokenizer):
    """One token per character (or per word, with ``words``); records what it tokenizes; ``delay`` seconds
    for a text of 1,000 characters or more; a vocabulary whose longest entry has ``longest`` characters."""

    def __init__(self, longest: int | None = None, words: bool = False, delay: float = 0.0) -> None:
        self.longest, self.words, self.delay = longest, words, delay
        self.texts: list[str] = []
        self.templates = 0
        self.started = threading.Event()

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        self.texts.append(text)
        self.started.set()
        if len(text) >= 1000:
            time.sleep(self.delay)
        if self.words:
            return {"input_ids": [len(word) for word in text.split()]}
        return super().__call__(text, add_special_tokens)

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        self.templates += 1
        return super().apply_chat_template(messages, tokenize, add_generation_prompt)

    def get_vocab(self) -> dict[str, int]:
        return {"x" * self.longest: 0} if self.longest else {}


def _fake_with(tokenizer: RecordingTokenizer, context_limit: int = 64) -> FakeScheduler:
    scheduler = FakeScheduler(context_limit=context_limit)
    scheduler.tokenizer = tokenizer
    return scheduler


def test_tokenizing_does_not_stall_the_event_loop():
    tokenizer = RecordingTokenizer(delay=1.0)
    with live_server(create_app(_fake_with(tokenizer, 4096), MODEL)) as (_, url):
        slow = threading.Thread(
            target=httpx.post, args=(url + "/v1/completions",), kwargs={"json": {**PROMPT, "prompt": "ab " * 500}}
        )
        slow.start()
        assert tokenizer.started.wait(10)
        started = time.monotonic()
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        waited = time.monotonic() - started
        slow.join()
    assert waited < 0.5, f"/health waited {waited:.2f} s for a tokenization"


def test_a_prompt_too_long_by_its_characters_is_refused_without_tokenizing():
    tokenizer = RecordingTokenizer(longest=3)
    with TestClient(create_app(_fake_with(tokenizer), MODEL)) as client:  # 63 tokens of prompt room at most
        response = client.post("/v1/completions", json={"prompt": "a" * (63 * 3 + 1), "max_tokens": 1})
        error = refusal(response)
        assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
        assert "more than 63 tokens (190 characters, and no token is longer than 3)" in error["message"]
        fits = client.post("/v1/completions", json={"prompt": "a" * 63, "max_tokens": 1})
        assert fits.status_code == 200
        assert tokenizer.texts == ["a" * 63]
        many = {"messages": [{"role": "user", "content": "a"}] * 64, "max_tokens": 1}
        error = refusal(client.post("/v1/chat/completions", json=many))
        assert error["param"] == "messages" and "'messages' holds 64 messages: more than the 63" in error["message"]
        assert tokenizer.templates == 0  # refused before the template ran


def test_a_long_prompt_is_refused_on_a_prefix_and_a_fitting_one_is_tokenized_whole():
    tokenizer = RecordingTokenizer(longest=100)  # the character bound (6,300 characters) lets 3,000 through
    with TestClient(create_app(_fake_with(tokenizer), MODEL)) as client:
        error = refusal(client.post("/v1/completions", json={"prompt": "ab " * 1000, "max_tokens": 1}))
        assert error["code"] == "context_length_exceeded" and "its first" in error["message"]
    assert max(len(text) for text in tokenizer.texts) < 600  # 3,000 characters, never tokenized whole
    words = RecordingTokenizer(longest=100, words=True)
    scheduler = _fake_with(words)
    prompt = " ".join(f"word{index:06d}" for index in range(60))  # 60 tokens in 659 characters
    with TestClient(create_app(scheduler, MODEL)) as client:
        assert client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).status_code == 200
    assert scheduler.requests[-1].prompt_ids == (10,) * 60 and words.texts[-1] == prompt
    assert len(words.texts) == 2  # one prefix counted, then the whole text


# 3. --max-context below the floor is refused at start -----------------------------------------------------
def test_a_max_context_that_cannot_serve_is_refused_at_start(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--max-context", "14"])
    assert "--max-context: must be at least 15, got 14" in capsys.readouterr().err
    assert cli.build_parser().parse_args(["serve", "--max-context", "15"]).max_context == 15


# 6. shutdown --------------------------------------------------------------------------------------------
def test_a_stopping_server_refuses_new_requests_at_once():
    scheduler = FakeScheduler()
    with TestClient(create_app(scheduler, MODEL)) as client:
        client.app.state.api.stop_admitting()
        for response in (client.post("/v1/completions", json=PROMPT), client.get("/health")):
            error = refusal(response, 503)
            assert error["code"] == "server_shutting_down" and error["type"] == "server_error"
    assert scheduler.requests == []


def _accepts(port: int) -> bool:
    """Whether a connection to ``port`` is taken (not refused, nor left unanswered while the listener closes)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except (ConnectionRefusedError, TimeoutError):
        return False


def _stream_lines(url: str, first: threading.Event, lines: list[str]) -> None:
    with httpx.stream("POST", url + "/v1/completions", json={**PROMPT, "max_tokens": 50, "stream": True}) as reply:
        for line in reply.iter_lines():
            lines.append(line)
            first.set()


def test_sigint_ends_what_runs_with_its_documented_error_after_the_grace(tmp_path):
    """Two streams and three whole requests, each longer than the grace (they hold after their first token)."""
    grace = 1.0
    with spawned_server(tmp_path, fake={"hold": True}, grace=grace) as server:
        streams = [([], threading.Event()) for _ in range(2)]
        threads = [threading.Thread(target=_stream_lines, args=(server.url, first, lines)) for lines, first in streams]
        whole: list[tuple[float, httpx.Response]] = []

        def post() -> None:
            response = httpx.post(server.url + "/v1/completions", json={**PROMPT, "max_tokens": 50}, timeout=30)
            whole.append((time.monotonic(), response))

        threads += [threading.Thread(target=post) for _ in range(3)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while "omnikv_requests_total 5" not in httpx.get(server.url + "/metrics").text:
            assert time.monotonic() < deadline, "the five requests never ran"
            time.sleep(0.05)
        assert all(first.wait(10) for _, first in streams)
        server.process.send_signal(signal.SIGINT)
        stopped = time.monotonic()
        while _accepts(server.port):
            assert time.monotonic() < stopped + 1, "new connections were still taken a second after SIGINT"
            time.sleep(0.02)
        time.sleep(grace / 2)
        assert not _accepts(server.port)  # still, while the requests run out their grace
        for thread in threads:
            thread.join(timeout=30)
        assert server.process.wait(timeout=30) is not None
    assert len(whole) == 3
    for ended, response in whole:
        assert grace - 0.2 <= ended - stopped < grace + END_WRITE_S + 1
        error = refusal(response, 503)
        assert error["code"] == "cancelled" and error["type"] == "server_error"
    for lines, _ in streams:
        events = [line.removeprefix("data: ") for line in lines if line]
        assert json.loads(events[0])["choices"][0]["text"] == "w0 "
        assert json.loads(events[-2])["error"]["code"] == "cancelled" and events[-1] == "[DONE]"


# 7. connections: timeouts, a cap, descriptors, the log ------------------------------------------------------
def _closed_by_server(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_silent_slow_and_idle_connections_are_closed():
    with live_server(create_app(FakeScheduler(), MODEL), header_timeout=0.5, keep_alive_timeout=0.5) as (_, url):
        port = int(url.rsplit(":", 1)[1])
        silent = socket.create_connection(("127.0.0.1", port))
        drip = socket.create_connection(("127.0.0.1", port))
        started = time.monotonic()
        for byte in b"GET /health HTTP/1.1\r\nHost:":  # one byte every 0.1 s: the head never completes in time
            try:
                drip.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.1)
        assert _closed_by_server(drip, 2) and time.monotonic() - started < 3
        assert _closed_by_server(silent, 2)
        idle = socket.create_connection(("127.0.0.1", port))
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle.recv(4096).startswith(b"HTTP/1.1 200")
        assert _closed_by_server(idle, 2)  # keep-alive over


def test_the_descriptor_limit_is_raised_and_checked_against_the_connections(capsys, no_model):
    resource = pytest.importorskip("resource")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, 4096) if hard == resource.RLIM_INFINITY else hard // 2
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
        assert raise_descriptor_limit(16) == (hard, hard) == resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY:
            with pytest.raises(ConfigError, match=f"max_connections.*this process may open {hard} files"):
                raise_descriptor_limit(hard)
            assert cli.main(["serve", "--max-connections", str(hard)]) == 2  # before the model loads
            assert "lower --max-connections" in capsys.readouterr().err
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_past_the_limit_of_requests_in_flight_a_request_gets_503_busy():
    scheduler = FakeScheduler(hold=True)  # each request holds after its first token
    with live_server(create_app(scheduler, MODEL), max_connections=2) as (_, url):
        held = [
            threading.Thread(target=httpx.post, args=(url + "/v1/completions",), kwargs={"json": PROMPT}) for _ in "ab"
        ]
        for thread in held:
            thread.start()
        while len(scheduler.requests) < 2:
            time.sleep(0.01)
        error = refusal(httpx.post(url + "/v1/completions", json=PROMPT), 503)
        assert error["code"] == "server_busy" and "limit of 2" in error["message"]
        scheduler.release.set()
        for thread in held:
            thread.join()
        assert httpx.post(url + "/v1/completions", json=PROMPT).status_code == 200
    assert len(scheduler.requests) == 3


def test_a_slow_header_flood_past_the_connection_limit(tmp_path):
    """Connections that never finish their head, ten times the limit: a normal request is still answered, and
    /health; the server holds no more connections than the limit, closes the rest after the header timeout,
    and its log barely grows."""
    limit = 16
    with spawned_server(tmp_path, max_connections=limit, header_timeout=1, keep_alive_timeout=1) as server:
        files, log = server.open_files(), server.log_bytes()
        flood = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(10 * limit)]
        for sock in flood:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
        time.sleep(0.3)  # the server has taken them all
        assert server.open_files() <= files + limit
        started = time.monotonic()
        reply = httpx.post(server.url + "/v1/completions", json=PROMPT, timeout=2)
        assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "w0 w1 w2 "
        for _ in range(3):
            assert httpx.get(server.url + "/health", timeout=2).status_code == 200
        assert time.monotonic() - started < 2
        assert all(_closed_by_server(sock, 4) for sock in flood)  # evicted at once, or at the header timeout
        assert server.log_bytes() - log < 100_000
        for sock in flood:
            sock.close()


def test_running_out_of_descriptors_logs_a_few_lines_and_recovers(tmp_path):
    """No connection cap and a descriptor limit of 128: a flood makes every accept fail (EMFILE), which the event
    loop reported with a traceback each, thousands a second. The log stays small; once the flood goes, the
    server answers again."""
    with spawned_server(tmp_path, open_files=128, max_connections=None, header_timeout=2) as server:
        log = server.log_bytes()
        flood = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(200)]
        time.sleep(1.2)  # accepts fail, are retried a second later, and fail again
        assert "out of system resource" in server.log.read_text()
        for sock in flood:
            sock.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(server.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the server did not recover"
        assert server.log_bytes() - log < 100_000

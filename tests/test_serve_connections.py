"""``omnikv serve``'s connections and its stop, over the fake scheduler of tests/serve_testlib.py: timeouts for
silent, slow and idle connections, the cap on connections and requests in flight, a slow-header flood, the
descriptor limit and running out of descriptors, and a graceful stop under SIGINT.

Servers are live (uvicorn on a loopback port, built as ``omnikv serve`` builds them), in a thread of this process,
or in a process of their own where signals, descriptor limits or the log must be the server's own. Limits and
timeouts are small, so each test takes a second or three.
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
from serve_testlib import FakeScheduler, live_server, refusal, spawned_server  # noqa: E402

from omnikv_runtime import cli  # noqa: E402
from omnikv_runtime.errors import ConfigError  # noqa: E402
from omnikv_runtime.serve.app import create_app  # noqa: E402
from omnikv_runtime.serve.server import END_WRITE_S, raise_descriptor_limit  # noqa: E402

MODEL = "fake-model"
PROMPT = {"prompt": "hello", "max_tokens": 3}


# shutdown --------------------------------------------------------------------------------------------
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


# connections: timeouts, a cap, descriptors, the log ------------------------------------------------------
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

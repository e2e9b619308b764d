"""Helpers of the serve tests: live servers, a stand-in for ``omnikv_runtime.serve.scheduler.Scheduler``
for fast tests of the HTTP layer, a check of refusals (:func:`refusal`), and a Prometheus text parser.

:func:`live_server` serves an app the way ``omnikv serve`` does (``build_server``: bounded connections,
graceful stop) on a free loopback port, in a thread of the test process. :func:`spawned_server` runs one
over a :class:`FakeScheduler` in a process of its own, for what needs the main thread (signals), its own
descriptor limit, or its own log (its stderr, in a file).

The fake keeps the real scheduler's interface (``tokenizer``, ``context_limit``, ``max_new_tokens``,
``start``, ``shutdown``, ``check``, ``submit``, ``metrics``; handles with ``request_id`` and ``cancel``) and
emits events from its own thread, as the real one does: the word ``w0 ``, ``w1 ``, ... per token, then
``finish_reason`` ``"length"`` (or ``finish`` when set: ``"stop"``, ``"error"``). With ``hold`` set, each
request waits after its first token until it is cancelled or ``release`` is set.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omnikv_runtime.serve.requests import AdmissionError, RequestEvent, ServeRequest

TESTS = Path(__file__).parent


@contextmanager
def live_server(app: Any, **options: Any) -> Iterator[tuple[Any, str]]:
    """``(server, url)``: ``app`` served by ``build_server(app, **options)`` on a free loopback port, in a
    thread; stopped (gracefully) when the block ends."""
    from omnikv_runtime.serve.server import build_server

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with another process
    port = sock.getsockname()[1]
    server = build_server(app, log_level="warning", **options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        assert not thread.is_alive()


_SPAWNED = """
import json, logging, resource, socket, sys
sys.path.insert(0, {tests!r})
args = json.loads(sys.argv[1])
if args["open_files"]:
    resource.setrlimit(resource.RLIMIT_NOFILE, (args["open_files"], args["open_files"]))
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
from serve_testlib import FakeScheduler
from omnikv_runtime.serve.app import create_app
from omnikv_runtime.serve.server import build_server
sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.bind(("127.0.0.1", 0))
print(sock.getsockname()[1], flush=True)
build_server(create_app(FakeScheduler(**args["fake"]), "fake-model"), **args["server"]).run(sockets=[sock])
"""


@dataclass
class Spawned:
    process: subprocess.Popen
    url: str
    port: int
    log: Path

    def log_bytes(self) -> int:
        return self.log.stat().st_size

    def open_files(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))


@contextmanager
def spawned_server(
    tmp_path: Path, fake: dict | None = None, open_files: int | None = None, **options: Any
) -> Iterator[Spawned]:
    """A server over ``FakeScheduler(**fake)``, built with ``build_server(app, **options)``, in a process of
    its own with ``open_files`` as its descriptor limit (soft and hard); its stderr goes to a file."""
    log = tmp_path / "server.log"
    args = json.dumps({"fake": fake or {}, "server": options, "open_files": open_files})
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", _SPAWNED.format(tests=str(TESTS)), args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        port = int(process.stdout.readline())
        spawned = Spawned(process, f"http://127.0.0.1:{port}", port, log)
        deadline = time.monotonic() + 60
        while not _answers(port):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        yield spawned
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        process.stdout.close()


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return sock.recv(64).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


def refusal(response: Any, status: int = 400) -> dict:
    """The error body of a refusal, after checking its status and that it has a code."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"], error
    return error


class CharTokenizer:
    """One token per character; a one-line chat template."""

    chat_template = "fake"

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(each) for each in text]}

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = False) -> str:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


@dataclass
class FakeHandle:
    request_id: str
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


class FakeScheduler:
    def __init__(
        self, context_limit: int = 256, hold: bool = False, finish: str = "length", max_new_tokens: int = 100
    ) -> None:
        self.tokenizer = CharTokenizer()
        self.context_limit = context_limit
        self.max_new_tokens = max_new_tokens  # new tokens per request at most, as the real scheduler's
        self.hold = hold
        self.finish = finish
        self.queue_full = False
        self.release = threading.Event()
        self.requests: list[ServeRequest] = []
        self.handles: list[FakeHandle] = []
        self.threads: list[threading.Thread] = []
        self.started = self.stopped = False
        self.rejected = 0
        self.follower = False  # one process: it serves (the real scheduler's rank other than 0 follows)

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.stopped = True

    def check(self, prompt_tokens: int | None, max_tokens: int) -> None:
        if max_tokens > self.max_new_tokens:
            self.rejected += 1
            raise AdmissionError(400, f"max_tokens over {self.max_new_tokens}", "max_tokens_exceeded")
        if prompt_tokens is not None and prompt_tokens + max_tokens > self.context_limit:
            self.rejected += 1
            message = f"{prompt_tokens} prompt tokens + {max_tokens} new > {self.context_limit}"
            raise AdmissionError(400, message, "context_length_exceeded")

    def submit(self, request: ServeRequest, on_event) -> FakeHandle:
        self.check(len(request.prompt_ids), request.max_tokens)
        if self.queue_full:
            self.rejected += 1
            raise AdmissionError(429, "the queue is full: retry later", "queue_full")
        handle = FakeHandle(request.request_id)
        self.requests.append(request)
        self.handles.append(handle)
        thread = threading.Thread(target=self._run, args=(request, handle, on_event), daemon=True)
        self.threads.append(thread)
        thread.start()
        return handle

    def _run(self, request: ServeRequest, handle: FakeHandle, on_event) -> None:
        prompt = len(request.prompt_ids)
        for index in range(request.max_tokens):
            if handle.cancelled.is_set():
                on_event(RequestEvent("", [], "cancelled", prompt, index))
                return
            last = index == request.max_tokens - 1
            reason = None
            if last:
                reason = self.finish
            text = "" if reason == "error" else f"w{index} "
            error = "the fake failed" if reason == "error" else None
            on_event(RequestEvent(text, [index], reason, prompt, index + 1, error))
            if self.hold and index == 0:
                while not (handle.cancelled.is_set() or self.release.is_set()):
                    handle.cancelled.wait(0.01)

    def metrics(self) -> dict:
        return {
            "requests_total": len(self.requests),
            "requests_rejected_total": self.rejected,
            "requests_running": 0,
            "queue_depth": 0,
            "batch_size": 1,
            "slots_free": 8,
            "prompt_tokens_total": sum(len(r.prompt_ids) for r in self.requests),
            "generation_tokens_total": 7,
            "pcie_bytes_total": 123456,
            "kv_bytes": {"gpu_dense": 10, "gpu_selected": 20, "gpu_tail": 30, "host_used": 40, "host_allocated": 50},
        }


_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[a-zA-Z_][a-zA-Z0-9_]*="[^"\\]*"\})? (\S+)$')


def parse_exposition(text: str) -> dict[str, float]:
    """Prometheus text format 0.0.4, strictly: a HELP and a TYPE line before each family's samples."""
    assert text.endswith("\n")
    samples: dict[str, float] = {}
    typed: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge") and name not in typed
            typed[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        assert name in typed, f"{name} has no TYPE line before it"
        assert not (typed[name] == "counter" and not name.endswith("_total"))
        samples[name + (labels or "")] = float(value)
    return samples

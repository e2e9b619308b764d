"""Hostile clients and a stop against the real ``omnikv serve`` (the bundled model, on the CPU, loopback).

Runs the command as a user would, in a process of its own::

    omnikv serve --config default --max-batch 4 --max-queue 3 --max-context 1024 --api-key ключ-123

then, in order: bodies that used to be 500s (a 5,000-digit integer, JSON nested 2,000 deep, lone
surrogates); a temperature of 1e-38 against greedy; a 6 MB prompt and a chat body of 200,000
messages while ``/health`` is polled (how long each took to be refused, the longest ``/health``
wait, the server's RSS); the non-ASCII key sent as UTF-8; ``--flood`` connections that never finish
their head (a normal request's and ``/health``'s time, the server's open descriptors, its log
growth); and SIGINT with two streams and three whole requests running, each longer than the grace
(how each ended, and when). Also ``--max-context 12``, which must be refused at start.

    python benchmarks/serve_attacks.py [--flood 2000] [--max-connections 512]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

KEY = "ключ-123"
AUTH = {"Authorization": f"Bearer {KEY}".encode()}
JSON = {"content-type": "application/json", **AUTH}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: bytes | dict, timeout: float = 120) -> tuple[int, dict | str, float]:
    started = time.monotonic()
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(url, content=raw, headers=JSON, timeout=timeout)
    try:
        payload = response.json()
    except ValueError:
        payload = response.text
    return response.status_code, payload, round(time.monotonic() - started, 3)


def code_of(payload: dict | str) -> str | None:
    return payload.get("error", {}).get("code") if isinstance(payload, dict) else None


def while_polling_health(base: str, work) -> tuple[object, float]:
    """``work()``'s result, and the longest /health answer time while it ran."""
    done, longest = threading.Event(), 0.0

    def poll() -> None:
        nonlocal longest
        while not done.is_set():
            started = time.monotonic()
            httpx.get(base + "/health", timeout=60)
            longest = max(longest, time.monotonic() - started)
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        return work(), round(longest, 3)
    finally:
        done.set()
        poller.join()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flood", type=int, default=2000, help="connections that never finish their head")
    parser.add_argument("--max-connections", type=int, default=512)
    args = parser.parse_args()
    report: dict[str, object] = {}
    omnikv = [sys.executable, "-m", "omnikv_runtime.cli"]
    refused = subprocess.run([*omnikv, "serve", "--max-context", "12"], capture_output=True, text=True, timeout=60)
    report["max_context_12"] = {"exit": refused.returncode, "message": refused.stderr.strip().splitlines()[-1]}

    port = free_port()
    base, log = f"http://127.0.0.1:{port}", Path(tempfile.mkdtemp()) / "serve.log"
    command = [*omnikv, "serve", "--config", "default", "--max-batch", "4", "--max-queue", "3"]
    command += ["--max-context", "1024", "--api-key", KEY, "--port", str(port)]
    command += ["--max-connections", str(args.max_connections)]
    with log.open("wb") as stderr:
        server = subprocess.Popen(command, stderr=stderr, stdout=stderr)
    process = psutil.Process(server.pid)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        completions, chat = base + "/v1/completions", base + "/v1/chat/completions"
        hostile = {
            "integer_5000_digits": (completions, b'{"prompt":"hi","max_tokens":' + b"9" * 5000 + b"}"),
            "nested_2000_deep": (completions, b'{"prompt":"hi","stop":' + b"[" * 2000 + b"]" * 2000 + b"}"),
            "surrogate_prompt": (completions, b'{"prompt":"ab\\ud800cd","max_tokens":1}'),
            "surrogate_chat": (chat, b'{"messages":[{"role":"user","content":"\\ud800"}],"max_tokens":1}'),
            "surrogate_model": (completions, b'{"prompt":"hi","model":"\\udcff"}'),
        }
        report["hostile"] = {name: post(url, raw)[:2] for name, (url, raw) in hostile.items()}
        prompt = {"prompt": "The capital of France is", "max_tokens": 8}
        greedy = post(completions, {**prompt, "temperature": 0})[1]["choices"][0]["text"]
        tiny = post(completions, {**prompt, "temperature": 1e-38})[1]["choices"][0]["text"]
        report["temperature_1e-38"] = {"greedy": greedy, "tiny": tiny, "equal": greedy == tiny}

        rss = [process.memory_info().rss]
        big = {"prompt": "hello " * 1_000_000, "max_tokens": 8}  # 6 MB, about a million tokens
        (status, payload, took), health = while_polling_health(base, lambda: post(completions, big))
        rss.append(process.memory_info().rss)
        report["prompt_6MB"] = {"status": status, "code": code_of(payload), "seconds": took, "health_max_s": health}
        many = {"messages": [{"role": "user", "content": "a"}] * 200_000, "max_tokens": 8}
        (status, payload, took), health = while_polling_health(base, lambda: post(chat, many))
        rss.append(process.memory_info().rss)
        report["chat_200000_messages"] = {
            "status": status,
            "code": code_of(payload),
            "seconds": took,
            "health_max_s": health,
        }
        report["rss_mib"] = [round(each / 2**20) for each in rss]
        report["non_ascii_key"] = post(completions, {**prompt, "max_tokens": 1})[0]

        files, log_bytes = process.num_fds(), log.stat().st_size
        flood = []
        for _ in range(args.flood):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
            flood.append(sock)
        time.sleep(1)
        status, _, took = post(completions, {**prompt, "max_tokens": 1})
        started = time.monotonic()
        health = httpx.get(base + "/health", timeout=20).status_code
        report["slow_header_flood"] = {
            "connections": args.flood,
            "request": [status, took],
            "health": [health, round(time.monotonic() - started, 3)],
            "server_descriptors": [files, process.num_fds()],
            "log_growth_bytes": log.stat().st_size - log_bytes,
        }
        for sock in flood:
            sock.close()

        ended: dict[str, object] = {}

        def whole(name: str) -> None:
            status, payload, took = post(completions, {**prompt, "max_tokens": 900}, timeout=60)
            ended[name] = [status, code_of(payload), round(time.monotonic() - stopped, 2) if stopped else None]

        def stream(name: str) -> None:
            body = {**prompt, "max_tokens": 900, "stream": True}
            with httpx.stream("POST", completions, json=body, headers=AUTH, timeout=60) as reply:
                lines = [line for line in reply.iter_lines() if line]
            last = json.loads(lines[-2].removeprefix("data: ")) if len(lines) > 1 else {}
            ended[name] = [code_of(last), lines[-1], round(time.monotonic() - stopped, 2) if stopped else None]

        stopped = None
        threads = [threading.Thread(target=stream, args=(f"stream{i}",)) for i in range(2)]
        threads += [threading.Thread(target=whole, args=(f"whole{i}",)) for i in range(3)]
        for thread in threads:
            thread.start()
        time.sleep(5)  # all five running or queued
        stopped = time.monotonic()
        server.send_signal(signal.SIGINT)
        time.sleep(1)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            refused_during_grace = False
        except ConnectionRefusedError:
            refused_during_grace = True
        for thread in threads:
            thread.join()
        server.wait(timeout=60)
        report["sigint"] = {"ended": ended, "new_connection_refused_after_1s": refused_during_grace}
    finally:
        if server.poll() is None:
            os.kill(server.pid, signal.SIGKILL)
    print(json.dumps(report, ensure_ascii=False, indent=1))


if __name__ == "__main__":
    main()

"""Helpers of the serve tests: a Prometheus text parser, and a stand-in for
``omnikv_runtime.serve.scheduler.Scheduler`` for fast tests of the HTTP layer.

The fake keeps the real one's interface (``tokenizer``, ``context_limit``, ``start``, ``shutdown``,
``submit``, ``metrics``; handles with ``request_id`` and ``cancel``) and emits events from its own
thread, as the real one does: the word ``w0 ``, ``w1 ``, ... per token, then ``finish_reason``
``"length"`` (or ``finish`` when set: ``"stop"``, ``"error"``). With ``hold`` set, each request
waits after its first token until it is cancelled or ``release`` is set.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

from omnikv_runtime.serve.requests import AdmissionError, RequestEvent, ServeRequest


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

    def start(self) -> None:
        self.started = True

    def shutdown(self) -> None:
        self.stopped = True

    def submit(self, request: ServeRequest, on_event) -> FakeHandle:
        if request.max_tokens > self.max_new_tokens:
            self.rejected += 1
            raise AdmissionError(400, f"max_tokens over {self.max_new_tokens}", "max_tokens_exceeded")
        if len(request.prompt_ids) + request.max_tokens > self.context_limit:
            self.rejected += 1
            message = f"{len(request.prompt_ids)} prompt tokens + {request.max_tokens} new > {self.context_limit}"
            raise AdmissionError(400, message, "context_length_exceeded")
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

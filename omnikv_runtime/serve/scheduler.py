"""Continuous batching: requests join the running batch between decode steps and leave when done.

One thread owns the engine. Each turn of its loop it

1. moves queued requests into free slots (a slot is taken when its prefill starts);
2. runs **prefill chunks** within the turn's token budget (``max_prefill_tokens``, default
   ``prefill.chunk_size``): the prefilling requests, oldest first, each get their next chunk where it fits
   what is left of the budget, all in one forward where the model allows it. A prompt is cut into chunks
   as ``Engine.generate`` cuts it (at multiples of ``prefill.chunk_size``), so a request's prefill does
   not depend on what else runs. So a long prompt never freezes the running batch for its whole
   prefill (decode steps and prefill chunks alternate, as in chunked-prefill schedulers: vLLM,
   Sarathi-Serve, LightLLM's split prefill), and a short prompt admitted behind a long one is
   prefilled beside it when the budget is larger than a chunk. After its last chunk a request's first
   token is chosen and it joins the batch;
3. runs **one decode step** of every busy slot, chooses each row's token with that request's own
   settings (and its own random stream when sampling), and hands each request its new text.

Each turn is a :class:`~omnikv_runtime.serve.turns.TurnPlan` (the slots dropped, the requests admitted,
the prefill chunks that run) that :class:`~omnikv_runtime.serve.turns.TurnRunner` runs on the batch;
the scheduler, as its chooser, picks each token and hands it out. Under tensor parallelism
(``distributed.tp_size > 1``) every rank builds the same scheduler: rank 0 runs it (and the HTTP server), and
the others call :meth:`Scheduler.follow`, which runs rank 0's plans on their own batch until it stops.

With a prefix cache (``prefix_cache_bytes``), an admitted request whose prompt starts with blocks of a prompt
served before reuses their KV (:mod:`~omnikv_runtime.serve.prefix_cache`): the plan says how many tokens, and its
prefill starts after them.

A request whose prompt and ``max_tokens`` cannot fit a slot is refused at :meth:`Scheduler.submit`
(HTTP 400), and one that finds the queue full too (429). Slots are allocated when the scheduler is
built (``max_batch`` rows of ``context_limit + 1`` columns); on CUDA the memory planner checks
then that they fit beside the weights, so an admitted request never runs out of memory.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from omnikv_runtime.decode.graph import CudaGraphRecorder, EagerRecorder
from omnikv_runtime.decode.sampling import choose_tokens
from omnikv_runtime.errors import ConfigError
from omnikv_runtime.serve.batch import SlotBatch
from omnikv_runtime.serve.metrics import batch_metrics
from omnikv_runtime.serve.prefix_cache import DEFAULT_BLOCK_TOKENS, PREFIX_METRICS, PrefixCache, planned_pools
from omnikv_runtime.serve.requests import (
    AdmissionError,
    LiveRequest,
    RequestEvent,
    RequestHandle,
    ServeRequest,
    admission_problem,
)
from omnikv_runtime.serve.slot_checks import (
    check_ranks_agree,
    check_scheduler_arguments,
    check_slots_fit,
    slot_sizes,
)
from omnikv_runtime.serve.text import eos_token_ids
from omnikv_runtime.serve.turns import PlanChannel, TurnPlan, TurnRunner

logger = logging.getLogger(__name__)


class Scheduler:
    """Serves requests through one engine with continuous batching (see the module docstring).

    Args:
        engine: an initialized engine with a tokenizer.
        max_batch: slots: requests decoding together.
        max_queue: requests waiting for a slot at most; more get HTTP 429.
        max_context: prompt plus new tokens of one request at most (default: the model's and the
            config's context limit); at least ``MIN_CONTEXT`` (15).
        max_new_tokens: new tokens of one request at most (the tail ring's size; default 1024, or
            anything up to the context with ``omnikv.tail_tokens`` set).
        recorder: how the batch's steps are recorded (default: CUDA graphs where the engine allows).
        prefix_cache_bytes: bytes of the prefix cache (0: none), which keeps the KV of prompts' full blocks of
            ``prefix_block_tokens`` tokens so that a later prompt starting with them prefills only the rest
            (:mod:`~omnikv_runtime.serve.prefix_cache`); allocated with the slots and checked with them.
        prefix_block_tokens: tokens per block of the prefix cache.
        max_prefill_tokens: prompt tokens prefilled per turn at most, over all prefilling requests (default:
            ``prefill.chunk_size``; more lets several requests' chunks run in one forward).

    Under tensor parallelism every rank builds its scheduler with the same arguments (checked across the
    ranks); rank 0 starts it, the others call :meth:`follow`.
    """

    idle_plan_s = 30.0  # with tensor parallelism: an idle rank 0 sends an empty plan this often

    def __init__(
        self,
        engine: Any,
        max_batch: int = 8,
        max_queue: int = 64,
        max_context: int | None = None,
        max_new_tokens: int | None = None,
        recorder: CudaGraphRecorder | EagerRecorder | None = None,
        prefix_cache_bytes: int = 0,
        prefix_block_tokens: int = DEFAULT_BLOCK_TOKENS,
        max_prefill_tokens: int | None = None,
    ) -> None:
        if engine.tokenizer is None:
            raise ConfigError("model", "no tokenizer", "a model with a tokenizer (the server decodes text)")
        check_scheduler_arguments(max_batch, max_queue, max_prefill_tokens)
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context_limit, self.max_new_tokens = slot_sizes(engine, max_context, max_new_tokens)
        blocks, prefix_bytes = planned_pools(engine, prefix_cache_bytes, prefix_block_tokens)
        check_slots_fit(engine, max_batch, self.context_limit, self.max_new_tokens, prefix_bytes, max_prefill_tokens)
        self.batch = SlotBatch(engine, max_batch, self.context_limit + 1, self.max_new_tokens, recorder=recorder)
        self.prefixes = None
        if blocks:
            window = self.batch.cache.selector.window_size
            self.prefixes = PrefixCache(engine, self.batch.cache.tiers, blocks, prefix_block_tokens, window)
            logger.info(
                "prefix cache: %d blocks of %d tokens (GPU %.2f GiB, host %.2f GiB)",
                blocks,
                prefix_block_tokens,
                *(size / 2**30 for size in prefix_bytes),
            )
        logger.info(
            "serving %d slots of %d tokens (%d new at most); KV tiers allocated: %s",
            max_batch,
            self.context_limit,
            self.max_new_tokens,
            ", ".join(f"{tier} {size / 2**30:.2f} GiB" for tier, size in self.batch.cache.tier_bytes().items()),
        )
        self.chunk_size = engine.config.prefill.chunk_size or self.context_limit
        self.max_prefill_tokens = max_prefill_tokens or self.chunk_size
        group = engine.tensor_parallel_group
        if group is not None:
            check_ranks_agree(
                group,
                self.batch.device,
                max_batch,
                self.context_limit,
                self.max_new_tokens,
                blocks,
                prefix_block_tokens,
            )
        channel = PlanChannel(group, self.batch.device) if group is not None else None
        self.turns = TurnRunner(self.batch, self.chunk_size, channel, self.prefixes)
        self.follower = not self.turns.leader  # a rank other than 0: it follows rank 0's turns
        self.eos_ids = set(eos_token_ids(engine))
        self._lock = threading.Condition()
        self._queue: collections.deque[LiveRequest] = collections.deque()
        self._prefilling: collections.deque[LiveRequest] = collections.deque()
        self._running: dict[int, LiveRequest] = {}  # row -> request
        self._cancelled: set[str] = set()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counts = collections.Counter()
        self._last_batch = 0

    # the HTTP side's calls (any thread) -----------------------------------------------------------
    def start(self) -> None:
        """Start the scheduler's thread (on rank 0 under tensor parallelism)."""
        if self.follower:
            raise ConfigError("rank", self.turns.channel.rank, "0 to start the scheduler: the other ranks follow()")
        self._thread = threading.Thread(target=self._run, name="omnikv-scheduler", daemon=True)
        self._thread.start()

    def follow(self) -> int:
        """On a rank other than 0 under tensor parallelism: run rank 0's turns on this rank's batch until rank 0
        stops (this thread; returns the turns run)."""
        if not self.follower:
            raise ConfigError("rank", 0, "another rank to follow: rank 0 runs the scheduler (start())")
        with torch.inference_mode():
            return self.turns.follow()

    def shutdown(self) -> None:
        """Stop the scheduler's thread (its requests end "cancelled"); under tensor parallelism the other ranks
        then stop following, also when the thread never started."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        self.turns.stop()

    def check(self, prompt_tokens: int | None, max_tokens: int) -> None:
        """Raise AdmissionError (400, counted as rejected) for a request that can never be served here: an
        empty prompt, ``max_tokens`` below 1 or over the cap per request, or prompt and ``max_tokens`` over
        the context. ``prompt_tokens`` None checks ``max_tokens`` alone (before the prompt is tokenized)."""
        problem = admission_problem(prompt_tokens, max_tokens, self.max_new_tokens, self.context_limit)
        if problem is not None:
            self._count("requests_rejected_total")
            raise AdmissionError(400, *problem)

    def submit(self, request: ServeRequest, on_event: Callable[[RequestEvent], None]) -> RequestHandle:
        """Queue ``request`` (:meth:`check`-ed first); its events go to ``on_event`` (on the scheduler's thread)."""
        prompt = len(request.prompt_ids)
        self.check(prompt, request.max_tokens)
        live = LiveRequest.open(request, on_event, self.tokenizer, self.batch.device)
        with self._lock:
            if self._stopping:
                raise AdmissionError(503, "the scheduler has stopped", "server_shutting_down")
            if len(self._queue) >= self.max_queue + self._free_slots():
                self._counts["requests_rejected_total"] += 1
                raise AdmissionError(429, f"the queue holds {self.max_queue} requests: retry later", "queue_full")
            self._queue.append(live)
            self._counts["requests_total"] += 1
            self._counts["prompt_tokens_total"] += prompt
            self._lock.notify_all()
        return RequestHandle(self._cancel, request.request_id)

    def metrics(self) -> dict[str, Any]:
        """Counters and gauges for ``/metrics`` (see the HTTP layer for their exposition)."""
        with self._lock:
            counts = dict(self._counts)
            running = len(self._running) + len(self._prefilling)
            queued = len(self._queue)
        prefixes = self.prefixes.metrics() if self.prefixes is not None else dict.fromkeys(PREFIX_METRICS, 0)
        return {
            **prefixes,
            **batch_metrics(self.batch, self.engine.transfer.stats, self.engine.config.offload.device == "cpu"),
            "requests_total": counts.get("requests_total", 0),
            "requests_rejected_total": counts.get("requests_rejected_total", 0),
            "requests_running": running,
            "queue_depth": queued,
            "batch_size": self._last_batch,
            "slots_free": self._free_slots(),
            "prompt_tokens_total": counts.get("prompt_tokens_total", 0),
            "generation_tokens_total": counts.get("generation_tokens_total", 0),
            "turns_total": self.turns.turns_run,
        }

    def _cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify_all()

    def _count(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def _free_slots(self) -> int:
        return len(self.batch.cache.free_rows()) - len(self._prefilling)

    # the scheduler's thread -----------------------------------------------------------------
    def _run(self) -> None:
        idle_plan_s = None if self.turns.channel is None else self.idle_plan_s
        with torch.inference_mode():
            while True:
                with self._lock:
                    while not (self._stopping or self._queue or self._prefilling or self._running or self._cancelled):
                        if not self._lock.wait(idle_plan_s):
                            break  # tensor parallel and idle: an empty plan keeps the other ranks' broadcast alive
                    if self._stopping:
                        break
                    cancelled, self._cancelled = self._cancelled, set()
                    ended = self._drop(cancelled)
                    admitted = self._admit()
                    order = [live.row for live in self._prefilling]
                admit = [(live.row, list(live.request.prompt_ids)) for live in admitted]
                reuse = self._reuse(admitted)
                plan = TurnPlan(
                    drop=[live.row for live in ended if live.row is not None],
                    admit=admit,
                    prefill=self.turns.plan_prefill(order, admit, self.max_prefill_tokens, reuse),
                    reuse=reuse,
                )
                try:
                    self.turns.run(plan, self)
                except Exception as exc:  # a failing step fails its requests, not the server
                    logger.exception("the batch step failed; its requests end with an error")
                    self._fail_all(f"{type(exc).__name__}: {exc}")
                    if self.turns.channel is not None:
                        logger.error("tensor parallel: after a failed turn the ranks may disagree; the scheduler stops")
                        with self._lock:
                            self._stopping = True
                        break
                finally:
                    for live in ended:
                        self._emit(live, "", [], "cancelled")
        self.turns.stop()
        self._fail_all(None)

    def _admit(self) -> list[LiveRequest]:
        """Queued requests take free slots (lock held); their prefill starts in this turn's plan."""
        free = [row for row in self.batch.cache.free_rows() if row not in {x.row for x in self._prefilling}]
        admitted = []
        while self._queue and free:
            live = self._queue.popleft()
            ids = list(live.request.prompt_ids)
            live.row = free[0] if self.prefixes is None else self.prefixes.best_row(ids, free)
            free.remove(live.row)
            self._prefilling.append(live)
            admitted.append(live)
        return admitted

    def _reuse(self, admitted: list[LiveRequest]) -> dict[int, int]:
        """The prompt tokens each admitted request takes from the prefix cache (slot -> tokens, none left out)."""
        if self.prefixes is None:
            return {}
        for live in admitted:
            live.reused = self.prefixes.lookup(list(live.request.prompt_ids), live.row)
        return {live.row: live.reused for live in admitted if live.reused}

    # the chooser of each turn (TurnRunner calls these on the scheduler's thread) ---------------------
    def choose(self, logits: torch.Tensor, rows: list[int]) -> dict[int, int]:
        """Each slot's token, with its request's settings (its own random stream when sampling)."""
        tokens = logits.argmax(dim=-1)
        for index, row in enumerate(rows):
            live = self._in_slot(row)
            if live.settings.do_sample:
                tokens[index] = choose_tokens(logits[index : index + 1], live.settings, live.generator)[0]
        return dict(zip(rows, tokens.tolist(), strict=True))

    def deliver(self, tokens: dict[int, int]) -> list[int]:
        """Hand each slot's token to its request (a prefilled one joins the decoding requests first); returns the
        slots whose request finished."""
        finished = []
        for row, token in tokens.items():
            live = self._running.get(row)
            if live is None:  # its prefill ended: its first token
                live = self._in_slot(row)
                live.first_token_at = time.perf_counter()
                self._running[row] = live
                with self._lock:
                    self._prefilling.remove(live)
            else:
                self._last_batch = len(tokens)
            if self._deliver(live, token):
                del self._running[row]
                finished.append(row)
        return finished

    def _in_slot(self, row: int) -> LiveRequest:
        """The request in slot ``row``: decoding, or at the end of its prefill."""
        if row in self._running:
            return self._running[row]
        return next(live for live in self._prefilling if live.row == row)

    def _deliver(self, live: LiveRequest, token: int) -> bool:
        """Hand ``token``'s text to the request; True when the request has finished."""
        live.tokens.append(token)
        self._count("generation_tokens_total")
        finish = None
        if token in self.eos_ids:
            finish, text = "stop", live.text.finish()
        else:
            text, stopped = live.text.add(token)
            if stopped:
                finish = "stop"
            elif len(live.tokens) >= live.request.max_tokens:
                finish, text = "length", text + live.text.finish()
        self._emit(live, text, [token], finish)
        return finish is not None

    def _emit(
        self, live: LiveRequest, text: str, tokens: list[int], finish: str | None, error: str | None = None
    ) -> None:
        event = RequestEvent(text, tokens, finish, len(live.request.prompt_ids), len(live.tokens), error)
        try:
            live.on_event(event)
        except Exception:  # the HTTP side's problem must not stop the batch
            logger.exception("request %s: delivering an event failed", live.request.request_id)
        if finish is not None:
            self._log_finished(live, finish)

    def _log_finished(self, live: LiveRequest, finish: str) -> None:
        now = time.perf_counter()
        first = live.first_token_at
        ttft = f"{(first - live.submitted) * 1e3:.0f} ms" if first is not None else "-"
        rate = (len(live.tokens) - 1) / (now - first) if first is not None and now > first else 0.0
        logger.info(
            "request %s: %d prompt tokens (%d reused), %d generated, time to first token %s, %.1f tokens/s, %s",
            live.request.request_id,
            len(live.request.prompt_ids),
            live.reused,
            len(live.tokens),
            ttft,
            rate,
            finish,
        )

    def _drop(self, cancelled: set[str]) -> list[LiveRequest]:
        """Take cancelled requests out wherever they are (lock held); their slots are freed by the turn's plan."""
        if not cancelled:
            return []
        queued = [x for x in self._queue if x.request.request_id in cancelled]
        for live in queued:
            self._queue.remove(live)
        prefilling = [x for x in self._prefilling if x.request.request_id in cancelled]
        for live in prefilling:
            self._prefilling.remove(live)
        running = [row for row, x in self._running.items() if x.request.request_id in cancelled]
        return queued + prefilling + [self._running.pop(row) for row in running]

    def _fail_all(self, error: str | None) -> None:
        """End every request (``error`` set: the step failed; None: the server is stopping)."""
        with self._lock:
            ended = list(self._queue) + list(self._prefilling)
            self._queue.clear()
            self._prefilling.clear()
        ended += list(self._running.values())
        self._running.clear()
        self.turns.reset()
        for live in ended:
            self._emit(live, "", [], "error" if error else "cancelled", error)

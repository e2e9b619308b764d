"""``omnikv serve``: an OpenAI-compatible HTTP server over one engine, with continuous batching.

    omnikv serve --config C [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch N|auto] [--max-queue N]
                 [--max-context N] [--max-body-bytes N] [--max-connections N] [--header-timeout S]
                 [--keep-alive-timeout S] [--prefix-cache-bytes N]
                 [--max-prefill-tokens N]

Under tensor parallelism (``distributed.tp_size > 1``, every rank started by ``torchrun`` or ``deepspeed``
with the same command) rank 0 serves HTTP and schedules; every other rank follows its schedule, serves
nothing, and exits when rank 0 stops.

Needs the ``serve`` extra (FastAPI and uvicorn). torch, transformers and FastAPI are imported only
when the command runs, not to parse or print help. The server binds the loopback interface unless
told otherwise, and warns when it listens elsewhere without an API key. What can be checked before
the model loads is: the API key, the context's floor, the open-file limit against the connections.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
from dataclasses import replace
from typing import Any

from omnikv_runtime.cli.generate import positive_int
from omnikv_runtime.errors import OmniKVError
from omnikv_runtime.serve import (
    DEFAULT_HEADER_TIMEOUT_S,
    DEFAULT_KEEP_ALIVE_S,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_CONNECTIONS,
    GRACEFUL_SHUTDOWN_S,
    MAX_AUTO_BATCH,
    MIN_CONTEXT,
)

logger = logging.getLogger(__name__)

API_KEY_ENV = "OMNIKV_API_KEY"
SERVE_EXTRA = 'omnikv serve needs FastAPI and uvicorn: pip install "omnikv-runtime[serve]"'
LOOPBACK = ("127.0.0.1", "::1", "localhost")
AUTO = "auto"  # --max-batch auto: the memory planner's count of slots


def context_tokens(text: str) -> int:
    """argparse type of --max-context: a whole number of at least MIN_CONTEXT."""
    value = positive_int(text)
    if value < MIN_CONTEXT:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_CONTEXT}, got {value} (a slot is its context plus one scratch column, and "
            f"the KV buffers are never narrower than {MIN_CONTEXT + 1} columns)"
        )
    return value


def byte_count(text: str) -> int:
    """argparse type of --prefix-cache-bytes: a whole number of bytes, at least 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of bytes, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0 (0: no prefix reuse), got {value}")
    return value


def max_batch_value(text: str) -> int | str:
    """argparse type of --max-batch: a whole number of at least 1, or 'auto'."""
    if text.strip().lower() == AUTO:
        return AUTO
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected a number of requests of at least 1, or '{AUTO}' (as many as fit), got {text!r}"
        ) from None


def seconds(text: str) -> float:
    """argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def register(commands: Any) -> None:
    serve = commands.add_parser(
        "serve", help="serve an OpenAI-compatible API (completions, chat) with continuous batching"
    )
    serve.add_argument("--config", default="default", help="config path or bundled name (default: default)")
    serve.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1; 0.0.0.0: every interface)"
    )
    serve.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    serve.add_argument(
        "--api-key",
        help=f"require 'Authorization: Bearer KEY' on every route but /health (default: ${API_KEY_ENV}, else none)",
    )
    serve.add_argument(
        "--max-batch",
        type=max_batch_value,
        metavar="N|auto",
        default=8,
        help="requests decoded together, each in a slot of --max-context tokens allocated at start (default: 8); "
        f"'{AUTO}': as many as fit on this machine, at most {MAX_AUTO_BATCH}. The memory planner counts them beside "
        "the weights, with the config's host tier (the model's dtype, or FP8 with offload.host_dtype = "
        "'float8_e4m3fn'); the server logs at start how many requests of its context this machine holds and how "
        "many a dense server (every layer's KV on the GPU, no offload) would hold on the same card",
    )
    serve.add_argument(
        "--max-queue", type=positive_int, default=64, help="requests waiting at most, then 429 (default: 64)"
    )
    serve.add_argument(
        "--max-context",
        type=context_tokens,
        help="prompt + new tokens of one request at most (default: the model's and the config's limit; at "
        f"least {MIN_CONTEXT}); every slot holds this many tokens, so it sizes the KV tiers",
    )
    serve.add_argument(
        "--max-prefill-tokens",
        type=positive_int,
        help="prompt tokens prefilled per turn at most, over every prefilling request (default: the config's "
        "prefill.chunk_size); a larger budget runs several requests' chunks in one forward",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"request body size limit, then 413 (default: {DEFAULT_MAX_BODY_BYTES})",
    )
    serve.add_argument(
        "--max-connections",
        type=positive_int,
        default=DEFAULT_MAX_CONNECTIONS,
        help="open connections and requests in flight at most: one more connection closes the one that has "
        f"waited longest for its next request, one more request gets 503 (default: {DEFAULT_MAX_CONNECTIONS})",
    )
    serve.add_argument(
        "--header-timeout",
        type=seconds,
        default=DEFAULT_HEADER_TIMEOUT_S,
        help="seconds a request's head may take to arrive, from the connection's opening or the request's "
        f"first byte; then the connection closes (default: {DEFAULT_HEADER_TIMEOUT_S:g})",
    )
    serve.add_argument(
        "--keep-alive-timeout",
        type=seconds,
        default=DEFAULT_KEEP_ALIVE_S,
        help=f"seconds an idle connection stays open after a response (default: {DEFAULT_KEEP_ALIVE_S:g})",
    )
    serve.add_argument(
        "--prefix-cache-bytes",
        type=byte_count,
        default=0,
        help="bytes of KV kept for prompt prefixes (GPU and host together, allocated at start and checked with the "
        "slots): a prompt starting with blocks of a prompt served before copies their KV and prefills only the rest "
        "(default: 0, no prefix reuse)",
    )
    serve.set_defaults(handler=cmd_serve)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """What to warn about a server on `host` with `api_key` (None: nothing, it is on loopback or keyed)."""
    if host in LOOPBACK or api_key:
        return None
    return (
        f"serving on {host} without an API key: anyone who can reach this port can use the model "
        f"(set --api-key or ${API_KEY_ENV})"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from omnikv_runtime.serve.app import create_app
        from omnikv_runtime.serve.guard import api_key_bytes
        from omnikv_runtime.serve.server import build_server, raise_descriptor_limit
    except ImportError as exc:  # said before the (slow) model load
        raise OmniKVError(str(exc) if "[serve]" in str(exc) else f"{exc}: {SERVE_EXTRA}") from None
    from omnikv_runtime.cli.threads import apply_cpu_threads
    from omnikv_runtime.config import load_config
    from omnikv_runtime.distributed import leave_process_group
    from omnikv_runtime.engine import initialize
    from omnikv_runtime.serve.scheduler import Scheduler

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is not None:
        api_key_bytes(api_key)  # refused now, not after the model loads
        if not api_key.isascii():
            logger.warning("the API key is not ASCII: it is compared as UTF-8, which some HTTP clients cannot send")
    warning = exposure_warning(args.host, api_key)
    if warning:
        logger.warning(warning)
    raise_descriptor_limit(args.max_connections)
    config = load_config(args.config)
    apply_cpu_threads(config.model.cpu_num_threads, config.model.device)
    engine = initialize(config=config)
    serve_logger = logging.getLogger("omnikv_runtime.serve")
    saved_level = serve_logger.level
    serve_logger.setLevel(logging.INFO)  # the slots' capacity at start, the scheduler's line per request, without -v
    try:
        max_batch = args.max_batch
        if max_batch == AUTO:
            max_batch = batch_that_fits(engine, args.max_context, args.prefix_cache_bytes, args.max_prefill_tokens)
        scheduler = Scheduler(
            engine,
            max_batch=max_batch,
            max_queue=args.max_queue,
            max_context=args.max_context,
            prefix_cache_bytes=args.prefix_cache_bytes,
            max_prefill_tokens=args.max_prefill_tokens,
        )
        if scheduler.follower:
            return follow(scheduler)
        app = create_app(scheduler, config.model.name_or_path, api_key=api_key, max_body_bytes=args.max_body_bytes)
        server = build_server(
            app,
            args.host,
            args.port,
            max_connections=args.max_connections,
            header_timeout=args.header_timeout,
            keep_alive_timeout=args.keep_alive_timeout,
            grace=GRACEFUL_SHUTDOWN_S,
        )
        logger.info(
            "serving %s on http://%s:%d/v1 (%d slots of %d tokens)",
            config.model.name_or_path,
            args.host,
            args.port,
            max_batch,
            scheduler.context_limit,
        )
        try:
            server.run()
        except KeyboardInterrupt:  # uvicorn raises the interrupt again after its graceful shutdown
            logger.info("stopped by an interrupt")
        finally:
            scheduler.shutdown()  # done already by the app's lifespan, unless uvicorn was forced out (a second Ctrl-C)
            leave_process_group()  # with several ranks: the others stopped following at the shutdown
    finally:
        serve_logger.setLevel(saved_level)
    return 0


def batch_that_fits(
    engine: Any, max_context: int | None, prefix_cache_bytes: int = 0, max_prefill_tokens: int | None = None
) -> int:
    """--max-batch auto: the most slots of the server's context that fit beside the prefix cache, with turns of
    ``max_prefill_tokens`` prompt tokens (the memory
    planner's count, the fewest of every rank's under tensor parallelism), at most MAX_AUTO_BATCH; ConfigError
    when not even one fits."""
    from omnikv_runtime.serve.prefix_cache import DEFAULT_BLOCK_TOKENS, planned_pools
    from omnikv_runtime.serve.slot_checks import auto_batch, fewest_across_ranks, slot_capacity, slot_sizes

    context, new_tokens = slot_sizes(engine, max_context, None)
    _, prefix_bytes = planned_pools(engine, prefix_cache_bytes, DEFAULT_BLOCK_TOKENS)
    capacity = slot_capacity(engine, context, new_tokens, prefix_bytes, max_prefill_tokens)
    fewest = fewest_across_ranks(engine.tensor_parallel_group, engine.device, capacity.slots)  # before any raise
    rows = auto_batch(replace(capacity, slots=fewest))
    logger.info(
        "--max-batch %s: %d slots of %d tokens (%d fit, at most %d)",
        AUTO,
        rows,
        context,
        capacity.slots,
        MAX_AUTO_BATCH,
    )
    return rows


def follow(scheduler: Any) -> int:
    """A rank other than 0 under tensor parallelism: no HTTP; run rank 0's turns until it stops."""
    from omnikv_runtime.distributed import leave_process_group

    rank = scheduler.turns.channel.rank
    logger.info("rank %d follows rank 0's schedule (rank 0 serves HTTP)", rank)
    # Ctrl-C in a terminal reaches every rank: rank 0 stops gracefully, then tells this one to stop
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        turns = scheduler.follow()
    finally:
        signal.signal(signal.SIGINT, previous)
    leave_process_group()
    logger.info("rank %d stopped with rank 0 after %d turns", rank, turns)
    return 0

"""``omnikv serve``: an OpenAI-compatible HTTP server over one engine, with continuous batching.

    omnikv serve --config C [--host 127.0.0.1] [--port 8000] [--api-key KEY] [--max-batch N] [--max-queue N]
                 [--max-context N] [--max-body-bytes N]

Needs the ``serve`` extra (FastAPI and uvicorn). torch, transformers and FastAPI are imported only
when the command runs, not to parse or print help. The server binds the loopback interface unless
told otherwise, and warns when it listens elsewhere without an API key.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from omnikv_runtime.cli.generate import positive_int
from omnikv_runtime.errors import OmniKVError
from omnikv_runtime.serve import DEFAULT_MAX_BODY_BYTES

logger = logging.getLogger(__name__)

API_KEY_ENV = "OMNIKV_API_KEY"
SERVE_EXTRA = 'omnikv serve needs FastAPI and uvicorn: pip install "omnikv-runtime[serve]"'
LOOPBACK = ("127.0.0.1", "::1", "localhost")
GRACEFUL_SHUTDOWN_S = 10  # open streams get this long to finish on Ctrl-C before they are cancelled


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
    serve.add_argument("--max-batch", type=positive_int, default=8, help="requests decoded together (default: 8)")
    serve.add_argument(
        "--max-queue", type=positive_int, default=64, help="requests waiting at most, then 429 (default: 64)"
    )
    serve.add_argument(
        "--max-context",
        type=positive_int,
        help="prompt + new tokens of one request at most (default: the model's and the config's limit); "
        "every slot holds this many tokens, so it sizes the KV tiers",
    )
    serve.add_argument(
        "--max-body-bytes",
        type=positive_int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"request body size limit, then 413 (default: {DEFAULT_MAX_BODY_BYTES})",
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
        import uvicorn

        from omnikv_runtime.serve.app import create_app
    except ImportError as exc:  # said before the (slow) model load
        raise OmniKVError(str(exc) if "[serve]" in str(exc) else f"{exc}: {SERVE_EXTRA}") from None
    from omnikv_runtime.cli.threads import apply_cpu_threads
    from omnikv_runtime.config import load_config
    from omnikv_runtime.engine import initialize
    from omnikv_runtime.serve.scheduler import Scheduler

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    warning = exposure_warning(args.host, api_key)
    if warning:
        logger.warning(warning)
    config = load_config(args.config)
    apply_cpu_threads(config.model.cpu_num_threads, config.model.device)
    engine = initialize(config=config)
    scheduler = Scheduler(engine, max_batch=args.max_batch, max_queue=args.max_queue, max_context=args.max_context)
    app = create_app(scheduler, config.model.name_or_path, api_key=api_key, max_body_bytes=args.max_body_bytes)
    serve_logger = logging.getLogger("omnikv_runtime.serve")
    saved_level = serve_logger.level
    serve_logger.setLevel(logging.INFO)  # the scheduler's line per request, without -v
    try:
        logger.info(
            "serving %s on http://%s:%d/v1 (%d slots of %d tokens)",
            config.model.name_or_path,
            args.host,
            args.port,
            args.max_batch,
            scheduler.context_limit,
        )
        uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    finally:
        serve_logger.setLevel(saved_level)
    return 0

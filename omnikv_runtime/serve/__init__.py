"""``omnikv serve``: an OpenAI-compatible HTTP server over one engine, with continuous batching.

:mod:`omnikv_runtime.serve.requests` holds what the HTTP layer and the batch scheduler exchange;
:mod:`omnikv_runtime.serve.scheduler` runs the batch (requests join and leave between decode steps), each turn
a plan of :mod:`~omnikv_runtime.serve.turns` (which the other ranks follow under tensor parallelism), after
the checks of :mod:`~omnikv_runtime.serve.slot_checks`, with the prefix reuse of
:mod:`~omnikv_runtime.serve.prefix_cache`;
:mod:`omnikv_runtime.serve.app` is the HTTP API (FastAPI), with :mod:`~omnikv_runtime.serve.schemas`
(request bodies, error bodies), :mod:`~omnikv_runtime.serve.guard` (API key, body limit),
:mod:`~omnikv_runtime.serve.prompts` (tokenizing off the event loop), :mod:`~omnikv_runtime.serve.sse`
(streamed chunks) and :mod:`~omnikv_runtime.serve.metrics` (Prometheus text);
:mod:`~omnikv_runtime.serve.server` runs it under uvicorn (connection limits, graceful stop).
Importing this package imports none of them.
"""

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # request bodies over this get a 413
DEFAULT_MAX_CONNECTIONS = 512  # open connections, and requests in flight, at most
DEFAULT_HEADER_TIMEOUT_S = 10.0  # a request head must arrive within this of the connection opening or its first byte
DEFAULT_KEEP_ALIVE_S = 5.0  # an idle connection closes this long after its last response
GRACEFUL_SHUTDOWN_S = 10.0  # on SIGINT/SIGTERM, running requests get this long to finish before they are ended
# The smallest context a server can have: the dense layers' KV buffers are never narrower than 16 columns, and a
# slot holds its context plus one scratch column; with fewer, the slot's masks and the buffers differ in width.
MIN_CONTEXT = 15
MAX_AUTO_BATCH = 64  # --max-batch auto takes the memory planner's count of slots, at most this many

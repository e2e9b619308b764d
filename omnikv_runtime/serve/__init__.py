"""``omnikv serve``: an OpenAI-compatible HTTP server over one engine, with continuous batching.

:mod:`omnikv_runtime.serve.requests` holds what the HTTP layer and the batch scheduler exchange;
:mod:`omnikv_runtime.serve.scheduler` runs the batch (requests join and leave between decode steps);
:mod:`omnikv_runtime.serve.app` is the HTTP API (FastAPI), with :mod:`~omnikv_runtime.serve.schemas`
(request bodies, error bodies), :mod:`~omnikv_runtime.serve.sse` (streamed chunks) and
:mod:`~omnikv_runtime.serve.metrics` (Prometheus text). Importing this package imports none of them.
"""

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024  # request bodies over this get a 413

"""``omnikv serve``: an OpenAI-compatible HTTP server over one engine, with continuous batching.

:mod:`omnikv_runtime.serve.requests` holds what the HTTP layer and the batch scheduler exchange;
:mod:`omnikv_runtime.serve.scheduler` runs the batch (requests join and leave between decode steps).
"""

"""The number of torch threads for a CPU run: ``model.cpu_num_threads``, else one core fewer than the process may use.

torch starts one OpenMP thread per core, and those threads spin at the end of every parallel
region until all have arrived. A decode step is hundreds of small operations, so when another
process holds one of the cores, every operation waits for the thread that lost its core: on a
shared 2-core machine, decoding the bundled model ran 28x slower with torch's 2 threads than with
1 (2.0 s against 56 s for 11 tokens; plain transformers behaves the same). Leaving one core to
the rest of the machine avoids most of it and costs little where there are many cores.

The ``omnikv`` commands apply this before loading a model; ``OMP_NUM_THREADS`` in the environment,
or ``model.cpu_num_threads`` in the config, wins over the default. Library users call
:func:`apply_cpu_threads` themselves (or ``torch.set_num_threads``): the library never changes a
process-wide setting on its own.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

THREADS_ENV = "OMP_NUM_THREADS"


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_cpu_threads(torch_threads: int, cores: int) -> int:
    """torch's own thread count, capped at one fewer than the usable cores (at least 1)."""
    return max(1, min(torch_threads, cores - 1))


def apply_cpu_threads(configured: int | None, device: str | None) -> int | None:
    """Set torch's thread count for a run on ``device``; returns the count set, or None when left alone.

    ``configured`` (``model.cpu_num_threads``) is applied on any device. Otherwise, on a CPU run
    (``device`` ``"cpu"``, or ``"auto"``/None without CUDA) and without ``OMP_NUM_THREADS`` set, the
    default of :func:`default_cpu_threads` is applied.
    """
    import torch

    if configured:
        torch.set_num_threads(configured)
        return configured
    on_cpu = device == "cpu" or (device in (None, "auto") and not torch.cuda.is_available())
    if not on_cpu or os.environ.get(THREADS_ENV):
        return None
    threads = default_cpu_threads(torch.get_num_threads(), usable_cores())
    if threads != torch.get_num_threads():
        logger.info(
            "torch threads: %d (one core left to the rest of the machine; set model.cpu_num_threads or %s to choose)",
            threads,
            THREADS_ENV,
        )
        torch.set_num_threads(threads)
    return threads

"""Evaluation harness: LongBench, InfiniteBench and offline synthetic retrieval tasks.

``omnikv eval --config C --benchmark {longbench,infinitebench,synthetic}`` runs it from the command
line (see docs/evaluation.md); :func:`run_eval` from Python.
"""

from omnikv_runtime.eval.runner import EvalOptions, run_eval

__all__ = ["EvalOptions", "run_eval"]

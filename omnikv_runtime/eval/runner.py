"""The evaluation runner: tasks -> sharded workers -> streamed predictions -> scores.

Layout of a run directory (``--out``)::

    run.json             the config and options of the run (a rerun must match them)
    raw/<task>.rank<r>.jsonl   predictions as they are made, one line each, flushed per sample
    <task>.jsonl         the task's predictions in dataset order (rewritten after each run)
    results.json         scores per task, failures, the average; no timings, so a resumed run
                         writes the same file as an uninterrupted one

A rerun skips the sample ids already in ``raw/`` (whatever world size wrote them); a record torn
by a kill, or one that cannot be read, is redone (see :mod:`omnikv_runtime.eval.records`). With
``world_size`` W > 1, W worker processes (spawned; one per GPU when CUDA is there, else CPU
processes splitting the cores) each load the model and take every W-th pending sample. A task
whose data cannot be read, or that has no samples, is recorded under ``failed`` and the other tasks
still run.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

import torch

from omnikv_runtime import progress
from omnikv_runtime.config import OmniKVConfig, load_config
from omnikv_runtime.errors import OmniKVError, did_you_mean
from omnikv_runtime.eval import infinitebench, longbench, synthetic
from omnikv_runtime.eval.data import EvalDataError, Sample
from omnikv_runtime.eval.records import raw_files, read_raw, read_run_record, repair_tail, write_json
from omnikv_runtime.eval.task import TaskSpec

logger = logging.getLogger(__name__)

BENCHMARKS = {
    "longbench": longbench.ALL_TASKS,
    "infinitebench": infinitebench.ALL_TASKS,
    "synthetic": synthetic.ALL_TASKS,
}
DEFAULT_TASKS = {
    "longbench": tuple(longbench.TASKS),
    "infinitebench": infinitebench.ALL_TASKS,
    "synthetic": synthetic.ALL_TASKS,
}
TIMING_KEYS = ("seconds",)


class EvalError(OmniKVError, ValueError):
    """Bad evaluation options (unknown benchmark or task, a run directory of another run)."""


@dataclass
class EvalOptions:
    benchmark: str
    tasks: list[str] | None = None
    data_dir: str | None = None
    limit: int | None = None
    world_size: int = 1
    out: str = "eval_runs/run"
    max_new_tokens: int | None = None  # cap every task's generation length (smoke tests)
    lengths: list[int] = field(default_factory=lambda: list(synthetic.DEFAULT_LENGTHS))
    depths: list[float] = field(default_factory=lambda: list(synthetic.DEFAULT_DEPTHS))
    samples: int = 1
    seed: int = 0


def task_specs(options: EvalOptions) -> list[TaskSpec]:
    """The TaskSpecs the options ask for; EvalError names an unknown benchmark or task."""
    known = BENCHMARKS.get(options.benchmark)
    if known is None:
        raise EvalError(f"unknown benchmark {options.benchmark!r}: use one of {sorted(BENCHMARKS)}")
    names = options.tasks or list(DEFAULT_TASKS[options.benchmark])
    specs = []
    for name in names:
        if name not in known:
            raise EvalError(
                f"unknown {options.benchmark} task {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}"
            )
        if options.benchmark == "longbench":
            specs.append(longbench.task_spec(name))
        elif options.benchmark == "infinitebench":
            specs.append(infinitebench.task_spec(name))
        else:
            specs.append(
                synthetic.task_spec(name, tuple(options.lengths), tuple(options.depths), options.samples, options.seed)
            )
    return specs


def _load_samples(spec: TaskSpec, options: EvalOptions) -> list[Sample]:
    samples = spec.load(Path(options.data_dir) if options.data_dir else None, options.limit)
    seen: dict[str, int] = {}
    for sample in samples:  # ids must be unique for resuming; number repeats
        count = seen.get(sample.id, 0)
        seen[sample.id] = count + 1
        if count:
            sample.id = f"{sample.id}#{count}"
    return samples


def context_limit(config: OmniKVConfig, model: Any, benchmark: str) -> int:
    """Prompt + generated tokens allowed: model.max_context_len, else 128K for InfiniteBench, capped by the model."""
    model_max = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None) or 10**9
    wanted = config.model.max_context_len or (
        infinitebench.DEFAULT_TRUNCATION if benchmark == "infinitebench" else None
    )
    return min(wanted, model_max) if wanted else model_max


def _worker_device(config: OmniKVConfig, rank: int, world_size: int) -> None:
    """Point worker ``rank`` at its GPU (CUDA) or its share of the CPU cores."""
    if world_size == 1:
        return
    if config.model.device != "cpu" and torch.cuda.is_available():
        config.model.device = f"cuda:{rank % torch.cuda.device_count()}"
    else:
        config.model.device = "cpu"
        torch.set_num_threads(config.model.cpu_num_threads or max(1, (os.cpu_count() or 1) // world_size))


def run_shard(
    rank: int,
    world_size: int,
    config_data: dict[str, Any],
    options: EvalOptions,
    assignments: dict[str, list[str]],
    model: Any = None,
    tokenizer: Any = None,
    show_progress: bool | None = None,
) -> None:
    """Predict the assigned sample ids of each task, appending to ``raw/<task>.rank<rank>.jsonl``.

    ``show_progress``: draw a bar of samples per task on stderr (None: as the process is set, see
    :mod:`omnikv_runtime.progress`); a spawned worker (given it) draws one line and no generation bars.
    """
    from omnikv_runtime.cli.threads import apply_cpu_threads
    from omnikv_runtime.engine import Engine
    from omnikv_runtime.eval.predict import Predictor

    draw_samples = progress.progress_bars_enabled() if show_progress is None else show_progress
    if show_progress is not None and world_size > 1:  # a spawned worker: one line each, no generation bars
        progress.disable_progress_bars()
    config = load_config(config_data)
    _worker_device(config, rank, world_size)
    if world_size == 1:
        apply_cpu_threads(config.model.cpu_num_threads, config.model.device)
    if model is None:
        from omnikv_runtime.models import load_configured_model

        model, tokenizer = load_configured_model(config)
    engine = Engine(model, config, tokenizer=tokenizer)
    predictor = Predictor(
        engine,
        tokenizer,
        context_limit(config, model, options.benchmark),
        config.generation.use_chat_template,
        config.generation.cot,
        options.max_new_tokens,
    )
    out = Path(options.out)
    (out / "raw").mkdir(parents=True, exist_ok=True)
    for spec in task_specs(options):
        wanted = set(assignments.get(spec.name, ()))
        if not wanted:
            continue
        samples = [s for s in _load_samples(spec, options) if s.id in wanted]
        raw = out / "raw" / f"{spec.name}.rank{rank}.jsonl"
        repair_tail(raw)  # a record torn by a kill must not swallow the next one
        bar = progress.bar(
            len(samples), spec.name, unit="sample", position=rank, leave=world_size == 1, enabled=draw_samples
        )
        with raw.open("a", encoding="utf-8") as sink:
            for sample in samples:
                if spec.prepare is not None:
                    sample = spec.prepare(sample, tokenizer)
                try:
                    record = predictor.predict(spec, sample)
                    record["score"] = spec.score(record["pred"], sample)
                except (OmniKVError, ValueError) as exc:  # this sample only: a prompt that cannot fit, bad answer
                    logger.error("%s %s: %s", spec.name, sample.id, exc)
                    record = {"error": str(exc), "score": 0.0}
                record = {"id": sample.id, **record, "answers": sample.answers}
                if spec.length_buckets:
                    record["length"] = sample.extra.get("length")
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                sink.flush()
                bar.update(1)
        bar.close()


def _check_run_dir(out: Path, config: OmniKVConfig, options: EvalOptions) -> None:
    run = {"config": config.to_dict(), "benchmark": options.benchmark}
    path = out / "run.json"
    try:
        previous = read_run_record(path)
    except EvalDataError as exc:
        raise EvalError(str(exc)) from None
    if previous is not None and {k: previous.get(k) for k in run} != run:
        raise EvalError(f"{out} holds a run of another config or benchmark; give another --out or delete the directory")
    write_json(path, {**run, "options": asdict(options)})


def _summarise(spec: TaskSpec, records: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in records if "error" not in r]
    summary: dict[str, Any] = {
        "metric": spec.metric,
        "score": round(100 * mean(r["score"] for r in scored), 2) if scored else None,
        "samples": len(records),
        "errors": len(records) - len(scored),
        "truncated": sum(bool(r.get("truncated")) for r in scored),
    }
    if spec.length_buckets:
        buckets: dict[str, list[float]] = {"0-4k": [], "4-8k": [], "8k+": []}
        for r in scored:
            length = r.get("length") or 0
            buckets["0-4k" if length < 4000 else "4-8k" if length < 8000 else "8k+"].append(r["score"])
        summary["buckets"] = {k: round(100 * mean(v), 2) if v else None for k, v in buckets.items()}
    if spec.benchmark == "synthetic":
        by_length: dict[str, list[float]] = {}
        for r in scored:
            by_length.setdefault(r["id"].split("-")[-3], []).append(r["score"])
        summary["by_length"] = {k: round(100 * mean(v), 2) for k, v in by_length.items()}
    return summary


def check_options(options: EvalOptions) -> None:
    """EvalError for counts below 1 (a negative --limit would silently drop samples)."""
    for name, value in (
        ("--world-size", options.world_size),
        ("--limit", options.limit),
        ("--samples", options.samples),
        ("--max-new-tokens", options.max_new_tokens),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise EvalError(f"{name} must be a whole number of at least 1, got {value!r}")


def run_eval(config: Any, options: EvalOptions, model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Run (or resume) an evaluation; returns what it writes to ``results.json``.

    ``model``/``tokenizer`` (optional, world size 1 only) reuse an already loaded model.
    """
    cfg = load_config(config)
    check_options(options)
    specs = task_specs(options)
    out = Path(options.out)
    _check_run_dir(out, cfg, options)
    loaded, failed, assignments = plan_shards(specs, options)
    if any(any(ids) for ids in assignments):
        _run_workers(cfg, options, assignments, model, tokenizer)
    return _collect(specs, loaded, failed, options, cfg)


def plan_shards(
    specs: list[TaskSpec], options: EvalOptions
) -> tuple[dict[str, list[Sample]], dict[str, str], list[dict[str, list[str]]]]:
    """Load each task's samples (recording failures) and deal the pending ids out to the workers.

    Returns ``(samples by task, failure message by task, per-rank {task: [sample ids]})``.
    """
    out = Path(options.out)
    failed: dict[str, str] = {}
    loaded: dict[str, list[Sample]] = {}
    assignments: list[dict[str, list[str]]] = [{} for _ in range(options.world_size)]
    for spec in specs:
        try:
            samples = _load_samples(spec, options)
        except (EvalDataError, ValueError) as exc:
            logger.error("task %s skipped: %s", spec.name, exc)
            failed[spec.name] = str(exc)
            continue
        if not samples:
            failed[spec.name] = "no samples: the task's data holds none (an empty file?)"
            logger.error("task %s skipped: %s", spec.name, failed[spec.name])
            continue
        loaded[spec.name] = samples
        for path in raw_files(out, spec.name):
            repair_tail(path)
        done = read_raw(out, spec.name)
        pending = [s.id for s in samples if s.id not in done]
        logger.info("%s: %d samples, %d done, %d to run", spec.name, len(samples), len(done), len(pending))
        for rank in range(options.world_size):
            assignments[rank][spec.name] = pending[rank :: options.world_size]
    return loaded, failed, assignments


def _run_workers(cfg: OmniKVConfig, options: EvalOptions, assignments, model, tokenizer) -> None:
    data = cfg.to_dict()
    if options.world_size == 1:
        run_shard(0, 1, data, options, assignments[0], model, tokenizer)
        return
    context = multiprocessing.get_context("spawn")
    workers = [
        context.Process(
            target=run_shard,
            args=(
                rank,
                options.world_size,
                data,
                options,
                assignments[rank],
                None,
                None,
                progress.progress_bars_enabled(),
            ),
        )
        for rank in range(options.world_size)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for rank, worker in enumerate(workers):
        if worker.exitcode:
            logger.error(
                "worker %d exited with code %s; its missing samples are listed in results", rank, worker.exitcode
            )


def _collect(specs, loaded, failed, options: EvalOptions, cfg: OmniKVConfig) -> dict[str, Any]:
    out = Path(options.out)
    tasks: dict[str, Any] = {}
    for spec in specs:
        if spec.name not in loaded:
            continue
        done = read_raw(out, spec.name)
        records = [done[s.id] for s in loaded[spec.name] if s.id in done]
        missing = len(loaded[spec.name]) - len(records)
        with (out / f"{spec.name}.jsonl").open("w", encoding="utf-8") as sink:
            for record in records:
                clean = {k: v for k, v in record.items() if k not in TIMING_KEYS}
                sink.write(json.dumps(clean, ensure_ascii=False) + "\n")
        tasks[spec.name] = _summarise(spec, records)
        if missing:
            failed[spec.name] = f"{missing} of {len(loaded[spec.name])} samples have no prediction (a worker failed)"
    scores = [t["score"] for t in tasks.values() if t["score"] is not None]
    results = {
        "benchmark": options.benchmark,
        "model": cfg.model.name_or_path,
        "omnikv": cfg.omnikv.enabled,
        "tasks": tasks,
        "failed": failed,
        "average": round(mean(scores), 2) if scores else None,
    }
    write_json(out / "results.json", results)
    return results

"""``omnikv eval`` and ``omnikv eval-report``: the evaluation harness on the command line.

omnikv eval --config C --benchmark {longbench,infinitebench,synthetic} [--tasks t1,t2]
            [--data-dir D] [--limit N] [--world-size W] [--out DIR] [--max-new-tokens N]
            [--lengths 1000,2000 --depths 0.1,0.5 --samples K --seed S]   (synthetic)
omnikv eval-report RUN_DIR [RUN_DIR ...] [--out PREFIX] [--no-chart]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def _csv(kind: type, allowed: tuple[str, object] | None = None):
    """argparse type: comma-separated `kind` values; `allowed` = (what, predicate) checks each one."""

    def parse(text: str) -> list:
        try:
            values = [kind(item) for item in text.split(",") if item.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind.__name__} values, got {text!r}") from None
        if allowed is not None:
            what, check = allowed
            for value in values:
                if not check(value):
                    raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return values

    return parse


LENGTHS = (int, ("whole numbers of at least 1", lambda n: n >= 1))
DEPTHS = (float, ("numbers from 0 to 1", lambda d: 0.0 <= d <= 1.0))


def cmd_eval(args: argparse.Namespace) -> int:
    from omnikv_runtime.config import load_config
    from omnikv_runtime.eval.runner import EvalOptions, run_eval

    config = load_config(args.config)
    out = args.out or str(Path("eval_runs") / f"{args.benchmark}-{Path(str(args.config)).stem}")
    options = EvalOptions(
        benchmark=args.benchmark,
        tasks=args.tasks,
        data_dir=args.data_dir,
        limit=args.limit,
        world_size=args.world_size,
        out=out,
        max_new_tokens=args.max_new_tokens,
        samples=args.samples,
        seed=args.seed,
    )
    if args.lengths:
        options.lengths = args.lengths
    if args.depths:
        options.depths = args.depths
    results = run_eval(config, options)
    width = max([len(t) for t in [*results["tasks"], *results["failed"]]] + [4])
    print(f"{'task':<{width}}  {'metric':<14}{'score':>8}{'samples':>9}")
    for task, entry in results["tasks"].items():
        score = "—" if entry["score"] is None else f"{entry['score']:.2f}"
        print(f"{task:<{width}}  {entry['metric']:<14}{score:>8}{entry['samples']:>9}")
    for task, message in results["failed"].items():
        print(f"{task:<{width}}  FAILED: {message}")
    print(f"average {results['average']}; predictions and results.json in {out}")
    return 1 if results["failed"] else 0


def cmd_report(args: argparse.Namespace) -> int:
    from omnikv_runtime.eval.report import bar_chart, load_run, markdown_table

    runs = [load_run(run_dir) for run_dir in args.runs]
    table = markdown_table(runs)
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table, end="")
    if not args.no_chart:
        print(f"chart: {bar_chart(runs, prefix.with_suffix('.png'))}")
    return 0


def register(commands: Any) -> None:
    ev = commands.add_parser("eval", help="run LongBench, InfiniteBench or the synthetic tasks")
    ev.add_argument("--config", default="default", help="config path or bundled name (default: default)")
    ev.add_argument("--benchmark", required=True, choices=["longbench", "infinitebench", "synthetic"])
    ev.add_argument("--tasks", type=_csv(str), help="comma-separated task names (default: all of the benchmark)")
    ev.add_argument("--data-dir", help="directory with the benchmark's <task>.jsonl files")
    ev.add_argument("--limit", type=int, help="first N samples of each task")
    ev.add_argument(
        "--world-size", type=int, default=1, help="worker processes (one per GPU on CUDA; default: %(default)s)"
    )
    ev.add_argument("--out", help="run directory (default: eval_runs/<benchmark>-<config>)")
    ev.add_argument("--max-new-tokens", type=int, help="cap every task's generation length (smoke tests)")
    ev.add_argument(
        "--lengths", type=_csv(*LENGTHS), help="synthetic: prompt lengths in tokens (default 1000,2000,3000)"
    )
    ev.add_argument("--depths", type=_csv(*DEPTHS), help="synthetic: needle depths in [0, 1] (default 0.1,0.5,0.9)")
    ev.add_argument(
        "--samples", type=int, default=1, help="synthetic: samples per length and depth (default: %(default)s)"
    )
    ev.add_argument(
        "--seed", type=int, default=0, help="synthetic: seed of the generated samples (default: %(default)s)"
    )
    ev.set_defaults(handler=cmd_eval)

    rep = commands.add_parser("eval-report", help="compare eval run directories: markdown table + PNG chart")
    rep.add_argument("runs", nargs="+", help="run directories written by `omnikv eval`")
    rep.add_argument(
        "--out", default="eval_report", help="output prefix: PREFIX.md and PREFIX.png (default: %(default)s)"
    )
    rep.add_argument("--no-chart", action="store_true", help="markdown only")
    rep.set_defaults(handler=cmd_report)

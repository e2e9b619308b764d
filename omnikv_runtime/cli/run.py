"""``omnikv run``: run an unmodified Python script with the OmniKV runtime.

    omnikv run [--config C] [--profile-memory DIR] [--stats-json F] [--strict] script.py [args...]

Every causal LM the script loads with ``from_pretrained`` (supported families) generates through
OmniKV; forwards without a cache (training, scoring) are unchanged. A model the runtime cannot take
runs without it after one warning (``--strict``: the run stops with exit code 2). The script's
arguments, output, exceptions, exit code and its own logging setup pass through: the runtime's log
lines go to stderr through a handler of the ``omnikv_runtime`` logger, the root logger is the
script's. See :mod:`omnikv_runtime.launcher`.

CPU threads: as the other ``omnikv`` commands, the run uses one torch thread fewer than the cores
(``model.cpu_num_threads`` or ``OMP_NUM_THREADS`` choose instead; see
:mod:`omnikv_runtime.cli.threads`), set before the script starts, so the script's own
``torch.set_num_threads`` still wins. When the script ends, one line on stderr per model says
which share of the context its sparse layers attended to.

Environment: ``OMNIKV_RUN_STATS=FILE`` stands for ``--stats-json FILE`` (the launcher reads it,
``--stats-json`` wins); ``OMNIKV_MODEL_CACHE`` is where converted GGUF models are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

EPILOG = """environment:
  OMNIKV_RUN_STATS=FILE  write the stats as --stats-json FILE does (--stats-json wins)
  OMNIKV_MODEL_CACHE     folder of GGUF models converted for fast loading ('off': none)"""


def register(commands: Any) -> None:
    run = commands.add_parser(
        "run",
        help="run a script; its models generate through OmniKV",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("--config", default="default", help="runtime config path or bundled name (default: default)")
    run.add_argument("--profile-memory", metavar="DIR", help="profile memory over the run; report written to DIR")
    run.add_argument(
        "--stats-json",
        metavar="FILE",
        help="write each wrapped model's generate stats here (default: $OMNIKV_RUN_STATS, if set)",
    )
    run.add_argument(
        "--strict", action="store_true", help="stop when a model cannot run with OmniKV (default: warn, run it as is)"
    )
    run.add_argument("script", help="the Python script to run")
    run.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    run.set_defaults(handler=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    if not Path(args.script).is_file():  # said before torch loads (Launcher.run says the same to library callers)
        print(f"omnikv run: can't open file {args.script!r}: no such file", file=sys.stderr)
        return 2
    from omnikv_runtime.cli.threads import apply_cpu_threads
    from omnikv_runtime.launcher import Launcher
    from omnikv_runtime.profiling.run_report import attended_note, attended_shares

    launcher = Launcher(args.config, stats_path=args.stats_json, profile_dir=args.profile_memory, strict=args.strict)
    apply_cpu_threads(launcher.config.model.cpu_num_threads, launcher.config.model.device)
    code = launcher.run(args.script, list(args.args))
    for wrapped in launcher.wrapped:
        note = attended_note([share for call in wrapped.calls for share in attended_shares(call)])
        if note:
            calls = f"{len(wrapped.calls)} generate call{'s' if len(wrapped.calls) > 1 else ''}"
            print(f"omnikv run: {type(wrapped.model).__name__}, {calls}: {note}", file=sys.stderr)
    return code

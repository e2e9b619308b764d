"""The ``omnikv`` command line.

Each subcommand lives in its own module, listed in ``COMMAND_MODULES``: each module has
``register(commands)``, which adds its subparser and sets ``handler`` (and, for a command whose
result has a text report, ``printer``). A handler returns an int (the exit code; the command
printed its own output) or a dict (printed with ``printer``, or as JSON with ``--json``).

Building the parser imports no command's dependencies: the modules import torch and transformers
inside their handlers, so ``omnikv --help``, ``omnikv CMD --help`` and ``omnikv --version`` answer
at once, and so do mistakes in paths and names (``--config``, ``--model-config``, a prompt file, a
script): each is checked before torch is imported. Long commands draw progress bars on stderr when it
is a terminal (``--quiet``: none).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata

from omnikv_runtime import __version__, progress
from omnikv_runtime.errors import OmniKVError

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
COMMAND_MODULES: tuple[str, ...] = (
    "omnikv_runtime.cli.generate",
    "omnikv_runtime.cli.plan",
    "omnikv_runtime.cli.run",
    "omnikv_runtime.cli.profile",
    "omnikv_runtime.cli.eval",
    "omnikv_runtime.cli.analyze",
    "omnikv_runtime.cli.serve",
)
CONFIG_COMMANDS = ("generate", "plan", "run", "profile", "eval", "analyze-layers", "serve")
PROGRESS_COMMANDS = ("generate", "run", "profile", "eval", "analyze-layers")  # the ones that take long
TRUST_HELP = "import the modules a config names as 'module:Class' policies (runs their code)"
QUIET_HELP = "no progress bars on stderr (they are drawn only when stderr is a terminal)"
HF_BARS_ENV = "HF_HUB_DISABLE_PROGRESS_BARS"  # transformers' and the Hub's bars (read when they are imported)
TQDM_OFF_ENV = "TQDM_DISABLE"  # every other tqdm bar (transformers' GGUF conversion draws its own)


def version_text() -> str:
    """This package's version and those of torch and transformers, read without importing them."""
    found = []
    for name in ("torch", "transformers"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return f"omnikv-runtime {__version__} ({', '.join(found)}, Python {platform.python_version()})"


def _configure_logging(verbose: bool, command: str) -> Callable[[], None]:
    """Log lines to stderr; returns what undoes it. Under ``omnikv run`` only the package's logger gets
    a handler: the root logger stays unconfigured, so the script's own ``logging.basicConfig`` works."""
    level = logging.INFO if verbose else logging.WARNING
    if command != "run":
        logging.basicConfig(level=level, format=LOG_FORMAT)
        return lambda: None
    package = logging.getLogger("omnikv_runtime")
    saved = package.level, package.propagate
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    package.addHandler(handler)
    package.setLevel(level)
    package.propagate = False  # printed once, whatever the script does with the root logger

    def restore() -> None:
        package.removeHandler(handler)
        package.setLevel(saved[0])
        package.propagate = saved[1]

    return restore


def _set_progress(args: argparse.Namespace) -> Callable[[], None]:
    """Bars on unless ``--quiet``; the libraries' own bars (loading weights, converting a GGUF file)
    off when ours would not show (``--quiet``, or stderr is not a terminal; under ``omnikv run`` only
    with ``--quiet``: the script's output is its own). Returns what undoes it."""
    saved_bars = progress.progress_bars_enabled()
    saved_env = {name: os.environ.get(name) for name in (HF_BARS_ENV, TQDM_OFF_ENV)}
    quiet = getattr(args, "quiet", True)
    progress.enable_progress_bars(not quiet)
    if quiet or (args.command != "run" and not progress.stderr_is_terminal()):
        for name in saved_env:
            os.environ.setdefault(name, "1")

    def restore() -> None:
        progress.enable_progress_bars(saved_bars)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)

    return restore


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnikv", description="OmniKV tiered-KV runtime for transformers")
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does")
    # DeepSpeed's launcher passes --local_rank=N before the command (the rank is in $LOCAL_RANK too)
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(commands)
    for name in CONFIG_COMMANDS:  # the commands that load a --config
        commands.choices[name].add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    for name in PROGRESS_COMMANDS:
        commands.choices[name].add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    restore_logging = _configure_logging(args.verbose, args.command)
    restore_progress = _set_progress(args)
    try:
        if args.command in CONFIG_COMMANDS:
            from omnikv_runtime.config import config_path, load_config  # pydantic: --help needs it not

            config_path(args.config, "--config")  # a mistyped --config is reported before torch loads
            if args.trust_remote_code:  # import the config's policy modules now, opted in
                load_config(args.config, trust_remote_code=True)
        result = args.handler(args)
    except (OmniKVError, OSError) as exc:
        print(f"omnikv: error: {exc}", file=sys.stderr)
        return 2
    finally:
        restore_progress()
        restore_logging()
    if isinstance(result, int):
        return result
    printer = getattr(args, "printer", None)
    if getattr(args, "json", False) or printer is None:
        print(json.dumps(result, indent=2))
    else:
        printer(result)
    return 0

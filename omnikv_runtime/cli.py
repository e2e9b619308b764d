"""The ``omnikv`` command line.

``omnikv generate --config C [--prompt-file F | stdin] [--max-new-tokens N] [--json]`` generates an
answer with OmniKV and reports what the runtime did. With no prompt it runs the built-in demo: a
passkey hidden in ~2,500 tokens of filler, answered by OmniKV and by dense side by side.

Other subcommands live in their own modules, listed in ``COMMAND_MODULES``: each module has
``register(commands)``, which adds its subparser and sets ``handler``. A handler returns an int
(the exit code; the command printed its own output) or a dict (printed as the report or ``--json``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from omnikv_runtime.config import OmniKVConfig, load_config
from omnikv_runtime.engine import Engine
from omnikv_runtime.errors import OmniKVError, PromptError

logger = logging.getLogger(__name__)

DEMO_TOKENS = 2500
DEMO_DEPTH = 0.5
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def _decode(data: bytes, where: str) -> str:
    """UTF-8 text of a prompt, or a PromptError naming ``where`` and the first bad byte."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(
            f"{where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}): save it as UTF-8"
        ) from None
    if not text.strip():
        raise PromptError(f"{where} is empty: give a prompt (without one, `omnikv generate` runs the passkey demo)")
    return text


def _stdin_is_piped() -> bool:
    """Whether stdin is a pipe or a redirected file (a prompt was meant), not a terminal or /dev/null."""
    if sys.stdin is None:
        return False
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError, AttributeError):  # a replaced stdin (io.StringIO) without a descriptor
        return not sys.stdin.isatty()
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def _read_stdin() -> str:
    buffer = getattr(sys.stdin, "buffer", None)
    return _decode(buffer.read(), "stdin") if buffer is not None else _decode(sys.stdin.read().encode(), "stdin")


def _read_prompt(prompt_file: str | None) -> str | None:
    """The prompt from --prompt-file (``-`` for stdin), else piped stdin, else None (the demo).

    Raises PromptError for a missing, unreadable, non-UTF-8 or empty prompt: checked before the model loads.
    """
    if prompt_file == "-":
        return _read_stdin()
    if prompt_file:
        try:
            data = Path(prompt_file).read_bytes()
        except OSError as exc:
            raise PromptError(f"--prompt-file {prompt_file}: cannot read it ({exc.strerror or exc})") from None
        return _decode(data, f"--prompt-file {prompt_file}")
    if _stdin_is_piped():
        return _read_stdin()
    return None


def _encode(engine: Engine, text: str, chat: bool) -> torch.Tensor:
    tokenizer = engine.tokenizer
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return tokenizer(text, return_tensors="pt", add_special_tokens=not chat)["input_ids"]


def _run(engine: Engine, input_ids: torch.Tensor, max_new_tokens: int) -> dict[str, Any]:
    output = engine.generate(input_ids, max_new_tokens=max_new_tokens)
    answer = engine.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    stats = engine.stats()
    selected = stats.get("selected_per_step", {})
    return {
        "answer": answer.strip(),
        "prompt_tokens": int(input_ids.shape[1]),
        "new_tokens": stats.get("new_tokens"),
        "plan": stats["plan"],
        "selected_tokens_per_step": {layer: (max(steps) if steps else 0) for layer, steps in selected.items()},
        "bytes": {**engine.memory_report()["tiers"], **stats["transfer"]},
        "prefill_seconds": round(stats.get("prefill_seconds", 0.0), 3),
        "decode_seconds": round(stats.get("decode_seconds", 0.0), 3),
    }


def _dense_twin(config: OmniKVConfig) -> OmniKVConfig:
    dense = config.model_copy(deep=True)
    dense.omnikv.enabled = False
    return dense


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from omnikv_runtime.models import load_model
    from omnikv_runtime.passkey import build_passkey_prompt, passkey_found

    config = load_config(args.config)
    prompt = _read_prompt(args.prompt_file)  # a bad prompt is reported before the (slow) model load
    if config.model.cpu_num_threads:
        torch.set_num_threads(config.model.cpu_num_threads)
    section = config.model
    model, tokenizer = load_model(
        section.name_or_path, section.dtype, section.attn_implementation, section.device, section.quantization
    )
    engine = Engine(model, config, tokenizer=tokenizer)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else config.generation.max_new_tokens
    if prompt is not None:
        return {
            "mode": "prompt",
            "omnikv": _run(engine, _encode(engine, prompt, config.generation.use_chat_template), max_new),
        }
    text, passkey = build_passkey_prompt(
        tokenizer, DEMO_TOKENS, DEMO_DEPTH, seed=0, use_chat_template=config.generation.use_chat_template
    )
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    result: dict[str, Any] = {"mode": "passkey demo", "passkey": passkey, "depth": DEMO_DEPTH}
    result["omnikv"] = _run(engine, input_ids, max_new)
    result["dense"] = _run(Engine(model, _dense_twin(config), tokenizer=tokenizer), input_ids, max_new)
    for name in ("omnikv", "dense"):
        result[name]["correct"] = passkey_found(result[name]["answer"], passkey)
    return result


def _mib(value: int) -> str:
    return f"{value / 2**20:.2f} MiB"


def _print_report(result: dict[str, Any]) -> None:
    if result["mode"] == "passkey demo":
        print(
            f"Passkey demo: a 5-digit passkey hidden at {result['depth']:.0%} depth; the passkey is {result['passkey']}"
        )
    runs = [name for name in ("omnikv", "dense") if name in result]
    for name in runs:
        run = result[name]
        mark = "" if "correct" not in run else ("  [correct]" if run["correct"] else "  [wrong]")
        print(f"\n{name} answer: {run['answer']}{mark}")
    for name in runs:
        run = result[name]
        print(f"\n[{name}] layers {run['plan']} (D dense, F filter, W wait, s sparse)")
        print(f"  prompt tokens        {run['prompt_tokens']}, new tokens {run['new_tokens']}")
        if run["selected_tokens_per_step"]:
            per_layer = ", ".join(f"layer {k}: {v}" for k, v in run["selected_tokens_per_step"].items())
            print(f"  selected per step    {per_layer}")
        tiers = run["bytes"]
        print(
            f"  KV bytes             GPU dense {_mib(tiers.get('gpu_dense', 0))}, "
            f"selected {_mib(tiers.get('gpu_selected', 0))}, tail {_mib(tiers.get('gpu_tail', 0))}, "
            f"host {_mib(tiers.get('host', 0))}"
        )
        print(f"  fetched / written    {_mib(tiers['bytes_fetched'])} / {_mib(tiers['bytes_written'])}")
        print(f"  prefill / decode     {run['prefill_seconds']:.2f} s / {run['decode_seconds']:.2f} s")


COMMAND_MODULES: tuple[str, ...] = (
    "omnikv_runtime.cli_plan",
    "omnikv_runtime.cli_run",
    "omnikv_runtime.cli_profile",
    "omnikv_runtime.cli_eval",
    "omnikv_runtime.cli_analyze",
)
CONFIG_COMMANDS = ("generate", "plan", "run", "profile", "eval", "analyze-layers")
TRUST_HELP = "import the modules a config names as 'module:Class' policies (runs their code)"


def _positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnikv", description="OmniKV tiered-KV runtime for transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate with OmniKV (no prompt: the passkey demo)")
    generate.add_argument("--config", default="default", help="config path or bundled name (default: default)")
    generate.add_argument("--prompt-file", help="file with the prompt, '-' for stdin")
    generate.add_argument("--max-new-tokens", type=_positive_int, help="tokens to generate (default: from the config)")
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    generate.set_defaults(handler=cmd_generate)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(commands)
    for name in CONFIG_COMMANDS:  # the commands that load a --config
        commands.choices[name].add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    restore_logging = _configure_logging(args.verbose, args.command)
    try:
        if getattr(args, "trust_remote_code", False):  # import the config's policy modules now, opted in
            load_config(args.config, trust_remote_code=True)
        result = args.handler(args)
    except (OmniKVError, OSError) as exc:
        print(f"omnikv: error: {exc}", file=sys.stderr)
        return 2
    finally:
        restore_logging()
    if isinstance(result, int):
        return result
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        _print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

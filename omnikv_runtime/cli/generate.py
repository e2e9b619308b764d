"""``omnikv generate``: generate an answer with OmniKV and report what the runtime did.

    omnikv generate --config C [--prompt-file F | stdin] [--max-new-tokens N] [--json] [--quiet]

With no prompt it runs the built-in demo: a passkey hidden in ~2,500 tokens of filler, answered by
OmniKV and by dense side by side. A config with ``omnikv.enabled = false`` runs, and is reported, as
dense. torch and transformers are imported only when a command runs, not to parse or print help.
"""

from __future__ import annotations

import argparse
import os
import stat
import sys
from pathlib import Path
from typing import Any

from omnikv_runtime.errors import PromptError

DEMO_TOKENS = 2500
DEMO_DEPTH = 0.5


def positive_int(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def register(commands: Any) -> None:
    generate = commands.add_parser("generate", help="generate with OmniKV (no prompt: the passkey demo)")
    generate.add_argument("--config", default="default", help="config path or bundled name (default: default)")
    generate.add_argument("--prompt-file", help="file with the prompt, '-' for stdin")
    generate.add_argument("--max-new-tokens", type=positive_int, help="tokens to generate (default: from the config)")
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    generate.set_defaults(handler=cmd_generate, printer=print_report)


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


def read_prompt(prompt_file: str | None) -> str | None:
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


def _encode(engine: Any, text: str, chat: bool) -> Any:
    tokenizer = engine.tokenizer
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
    return tokenizer(text, return_tensors="pt", add_special_tokens=not chat)["input_ids"]


def _run(engine: Any, input_ids: Any, max_new_tokens: int) -> dict[str, Any]:
    from omnikv_runtime.profiling.run_report import summarize_run

    output = engine.generate(input_ids, max_new_tokens=max_new_tokens)
    answer = engine.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    return summarize_run(engine, int(input_ids.shape[1]), answer)


def cmd_generate(args: argparse.Namespace) -> dict[str, Any]:
    from_file = args.prompt_file not in (None, "-")
    prompt = read_prompt(args.prompt_file) if from_file else None  # a missing file is reported before torch loads
    from omnikv_runtime.cli.threads import apply_cpu_threads
    from omnikv_runtime.config import load_config
    from omnikv_runtime.engine import Engine
    from omnikv_runtime.eval.passkey import build_passkey_prompt, passkey_found
    from omnikv_runtime.models import load_configured_model
    from omnikv_runtime.planner.fit import dense_twin

    config = load_config(args.config)
    if not from_file:
        prompt = read_prompt(args.prompt_file)  # stdin, read once the config is known to be good
    section = config.model
    apply_cpu_threads(section.cpu_num_threads, section.device)
    model, tokenizer = load_configured_model(config)
    engine = Engine(model, config, tokenizer=tokenizer)
    max_new = args.max_new_tokens if args.max_new_tokens is not None else config.generation.max_new_tokens
    if prompt is not None:
        run = _run(engine, _encode(engine, prompt, config.generation.use_chat_template), max_new)
        return {"mode": "prompt", run["runs"]: run}
    text, passkey = build_passkey_prompt(
        tokenizer, DEMO_TOKENS, DEMO_DEPTH, seed=0, use_chat_template=config.generation.use_chat_template
    )
    input_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    result: dict[str, Any] = {"mode": "passkey demo", "passkey": passkey, "depth": DEMO_DEPTH}
    runs = {"omnikv": engine, "dense": Engine(model, dense_twin(config), tokenizer=tokenizer)}
    if not config.omnikv.enabled:  # a dense config: one dense run, not the same run twice
        runs = {"dense": engine}
    for name, each in runs.items():
        result[name] = _run(each, input_ids, max_new)
        result[name]["correct"] = passkey_found(result[name]["answer"], passkey)
    return result


def print_report(result: dict[str, Any]) -> None:
    from omnikv_runtime.profiling.run_report import run_lines

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
        print()
        print("\n".join(run_lines(name, result[name])))

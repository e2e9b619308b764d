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
import sys
from typing import Any

import torch

from omnikv_runtime.config import OmniKVConfig, load_config
from omnikv_runtime.engine import Engine
from omnikv_runtime.errors import OmniKVError

logger = logging.getLogger(__name__)

DEMO_TOKENS = 2500
DEMO_DEPTH = 0.5


def _read_prompt(prompt_file: str | None) -> str | None:
    """The prompt from --prompt-file (``-`` for stdin), else piped stdin, else None (the demo)."""
    if prompt_file == "-":
        return sys.stdin.read()
    if prompt_file:
        with open(prompt_file, encoding="utf-8") as handle:
            return handle.read()
    if sys.stdin is not None and not sys.stdin.isatty():
        text = sys.stdin.read()
        return text if text.strip() else None
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
    if config.model.cpu_num_threads:
        torch.set_num_threads(config.model.cpu_num_threads)
    section = config.model
    model, tokenizer = load_model(
        section.name_or_path, section.dtype, section.attn_implementation, section.device, section.quantization
    )
    engine = Engine(model, config, tokenizer=tokenizer)
    max_new = args.max_new_tokens or config.generation.max_new_tokens
    prompt = _read_prompt(args.prompt_file)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnikv", description="OmniKV tiered-KV runtime for transformers")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the runtime does")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate with OmniKV (no prompt: the passkey demo)")
    generate.add_argument("--config", default="default", help="config path or bundled name (default: default)")
    generate.add_argument("--prompt-file", help="file with the prompt, '-' for stdin")
    generate.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: from the config)")
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    generate.set_defaults(handler=cmd_generate)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(commands)
    for name in CONFIG_COMMANDS:  # the commands that load a --config
        commands.choices[name].add_argument("--trust-remote-code", action="store_true", help=TRUST_HELP)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if getattr(args, "trust_remote_code", False):  # import the config's policy modules now, opted in
            load_config(args.config, trust_remote_code=True)
        result = args.handler(args)
    except (OmniKVError, OSError) as exc:
        print(f"omnikv: error: {exc}", file=sys.stderr)
        return 2
    if isinstance(result, int):
        return result
    if getattr(args, "json", False):
        print(json.dumps(result, indent=2))
    else:
        _print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

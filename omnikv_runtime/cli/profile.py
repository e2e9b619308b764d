"""``omnikv profile`` and ``omnikv profile-plot``: a memory profile of one generation run.

    omnikv profile --config C [--out DIR] [--prompt-tokens N] [--max-new-tokens N] [--batch B]
                   [--random-weights [--model-config X]] [--device D]
    omnikv profile-plot DIR/report.json [--out timeline.png]

``profile`` generates once through OmniKV inside :func:`omnikv_runtime.profiling.profile_memory`
and writes report.json, timeline.png and trace.json.gz (Perfetto) into DIR. With
``--random-weights`` the model is built from its geometry with random weights (no download, no
tokenizer: random prompt ids), e.g. Llama-3-8B geometry on a GPU machine. ``profile-plot`` draws
the PNG from a report.json later (where matplotlib is installed).
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported by the handlers: building the parser (--help) needs no torch
    import torch


def register(commands: Any) -> None:
    profile = commands.add_parser("profile", help="memory profile of a generation run (report, PNG, Chrome trace)")
    profile.add_argument("--config", default="default", help="config path or bundled name (default: default)")
    profile.add_argument("--out", default="omnikv_profile", help="output folder (default: omnikv_profile)")
    profile.add_argument("--prompt-tokens", type=int, default=2000, help="prompt length (default 2000)")
    profile.add_argument("--max-new-tokens", type=int, help="tokens to generate (default: from the config)")
    profile.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    profile.add_argument("--random-weights", action="store_true", help="random weights of the model's geometry")
    profile.add_argument("--model-config", help="with --random-weights: config.json, HF folder or known name")
    profile.add_argument("--device", help="override model.device (cpu, cuda, cuda:N)")
    profile.add_argument("--no-warmup", action="store_true", help="skip the short untimed warm-up run")
    profile.add_argument("--json", action="store_true", help="print one JSON object")
    profile.set_defaults(handler=cmd_profile)
    plot = commands.add_parser("profile-plot", help="draw the PNG timeline of a profile's report.json")
    plot.add_argument("report", help="report.json written by omnikv profile / --profile-memory")
    plot.add_argument("--out", help="PNG path (default: timeline.png next to the report)")
    plot.set_defaults(handler=cmd_plot)


def _model_and_prompt(args: argparse.Namespace, config: Any) -> tuple[Any, Any, torch.Tensor]:
    import torch

    from omnikv_runtime.models import resolve_device

    device = resolve_device(args.device or config.model.device)
    if args.random_weights:
        from omnikv_runtime.models.random import random_model

        new_tokens = args.max_new_tokens or config.generation.max_new_tokens
        model = random_model(config, args.model_config, device, min_positions=args.prompt_tokens + new_tokens)
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt_tokens), generator=generator)
        return model, None, ids
    from omnikv_runtime.eval.passkey import build_passkey_prompt
    from omnikv_runtime.models import load_configured_model

    model, tokenizer = load_configured_model(config, device=str(device))
    text, _ = build_passkey_prompt(
        tokenizer, args.prompt_tokens, 0.5, seed=0, use_chat_template=config.generation.use_chat_template
    )
    ids = tokenizer([text] * args.batch, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return model, tokenizer, ids


def cmd_profile(args: argparse.Namespace) -> dict[str, Any] | int:
    import torch

    from omnikv_runtime.cli.threads import apply_cpu_threads
    from omnikv_runtime.config import load_config
    from omnikv_runtime.engine import Engine
    from omnikv_runtime.profiling import profile_memory
    from omnikv_runtime.profiling.run_report import tier_label

    config = load_config(args.config)
    apply_cpu_threads(config.model.cpu_num_threads, args.device or config.model.device)
    model, tokenizer, ids = _model_and_prompt(args, config)
    engine = Engine(model, config, tokenizer=tokenizer)
    new_tokens = args.max_new_tokens or config.generation.max_new_tokens
    pad = {"pad_token_id": 0} if tokenizer is None else {}
    if not args.no_warmup:  # compile/launch caches outside the profile
        engine.generate(ids[:, : min(64, ids.shape[1])], max_new_tokens=2, **pad)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(engine.device)
    with profile_memory(engine, out_dir=args.out) as profiler:
        engine.generate(ids, max_new_tokens=new_tokens, **pad)
    report = profiler.report()
    result = {
        "files": profiler.files,
        "summary": report["summary"],
        "geometry_check": report["engines"][0]["geometry_check"],
    }
    if args.json:
        return result
    summary = result["summary"]
    print(f"profile of {ids.shape[0]} x {ids.shape[1]} prompt tokens + {new_tokens} new ({engine.plan.describe()})")
    steps = f"decode steps {summary['decode_steps']}, fetches {summary['fetches']}"
    print(f"  prefill forwards {summary['prefill_forwards']}, {steps}")
    compute, host = str(engine.device), str(engine.transfer.host_device)
    for tier, value in summary["peak_tiers"].items():
        print(f"  peak {tier_label(tier, compute, host):33} {value / 2**20:12.2f} MiB")
    for device, peaks in summary.get("peak_gpu", {}).items():
        print(f"  {'GPU ' + device + ' peak allocated':38} {peaks['max_allocated'] / 2**20:12.2f} MiB")
    pinned = summary["peak_pinned"] / 2**20
    print(f"  {'host RSS peak':38} {summary['peak_host_rss'] / 2**20:12.2f} MiB, pinned {pinned:.2f} MiB")
    checks = result["geometry_check"] or {}
    matches = all(c["match"] for c in checks.values())
    print(f"  tier bytes = layers x tokens x kv_heads x head_dim x 2 x dtype x batch: {matches}")
    for name, path in profiler.files.items():
        print(f"  {name:14} {path}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from omnikv_runtime.errors import OmniKVError
    from omnikv_runtime.profiling.plot import plot_report

    report = Path(args.report)
    if not report.is_file():
        raise OmniKVError(f"no report at {report}: give the report.json an `omnikv profile` run wrote")
    target = Path(args.out) if args.out else report.with_name("timeline.png")
    if not plot_report(report, target):
        return 1
    print(target)
    return 0

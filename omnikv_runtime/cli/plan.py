"""``omnikv plan``: the memory a run needs, before anything is allocated.

    omnikv plan --config C --context 131072 --batch 4 [--gpu-memory 80GB] [--host-memory 512GB] [--json]

Prints the bytes of the weights, each KV tier and activations, whether the run
fits dense and with OmniKV, and the longest context that fits each way (for OmniKV with offload to
the host, once per host-tier dtype: the model's and FP8), and which host tier would make a decode
step faster (the bytes a step moves over PCIe with each, the host-to-device bandwidth: measured on
CUDA, else the planner's default figure, and each tier's floor). The model's geometry comes
from ``--model-config`` (a config.json, an HF folder or a known name) or the config's model; no
weights are read. A run longer than the model's position limit (``max_position_embeddings``, or
``--max-position`` for a model whose RoPE reaches further) does not fit, whatever the memory: the
report says so, and the longest context is capped there.

Exit status: 0 when the config's own run (OmniKV, or dense for a config with OmniKV off) fits,
1 when it does not (memory or positions; the dense column is a comparison and does not count),
2 for bad input.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import replace
from typing import Any

from omnikv_runtime.cli.generate import positive_int
from omnikv_runtime.config import DTYPES, HOST_DTYPES
from omnikv_runtime.geometry import KNOWN_GEOMETRIES, geometry_config

# torch and the planner are imported by the handler: building the parser (--help) needs neither
HEADROOM_HELP = "0.05"  # planner.fit.DEFAULT_HEADROOM, written out so that --help imports nothing (tested)
POSITION_LIMIT = "the model's position limit"
DEFAULT_GPU_MEMORY = 80 * 10**9  # one H100 80 GB card, when no CUDA device is visible
LONG_CONTEXT_MODEL = "llama3.1-8b"  # suggested when a run is past a shorter model's position limit
LONG_CONTEXT_POSITIONS = KNOWN_GEOMETRIES[LONG_CONTEXT_MODEL]["max_position_embeddings"]


def register(commands: Any) -> None:
    plan = commands.add_parser("plan", help="memory plan of a run: tiers, fits dense / OmniKV, longest context")
    plan.add_argument("--config", default="default", help="config path or bundled name (default: default)")
    plan.add_argument("--context", type=int, required=True, help="prompt tokens per sequence")
    plan.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    plan.add_argument("--new-tokens", type=int, help="tokens to generate (default: generation.max_new_tokens)")
    plan.add_argument("--gpu-memory", help="GPU memory, e.g. 80GB (default: this CUDA device, else 80GB)")
    plan.add_argument("--host-memory", help="host memory for the pinned tier, e.g. 512GB (default: this machine)")
    plan.add_argument("--model-config", help="config.json, HF folder or known name (default: the config's model)")
    plan.add_argument(
        "--max-position",
        type=positive_int,
        help="the model's position limit in tokens, for a model whose RoPE reaches past its config's "
        "(default: max_position_embeddings)",
    )
    plan.add_argument("--dtype", choices=sorted(DTYPES), help="weights/KV dtype (default: model.dtype)")
    plan.add_argument(
        "--host-dtype", choices=sorted(HOST_DTYPES), help="host tier storage (default: offload.host_dtype)"
    )
    plan.add_argument(
        "--tp-size", type=int, help="GPUs splitting the heads: figures per GPU (default: distributed.tp_size)"
    )
    plan.add_argument(
        "--offload-weights",
        action="store_true",
        help="weights in host memory, fetched layer by layer (ZeRO-Inference; default: distributed.offload_weights)",
    )
    plan.add_argument("--headroom", type=float, help=f"share of each memory kept free (default: {HEADROOM_HELP})")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(handler=cmd_plan)


def _within_positions(longest: dict[str, Any], max_positions: int | None, new_tokens: int) -> dict[str, Any]:
    """A longest-context answer capped at the model's position limit (prompt + new tokens)."""
    if not max_positions or longest["context"] <= max_positions - new_tokens:
        return longest
    return {
        "context": max(0, max_positions - new_tokens),
        "limited_by": POSITION_LIMIT,
        "memory_allows": longest["context"],
    }


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    import psutil
    import torch

    from omnikv_runtime.config import load_config
    from omnikv_runtime.errors import ConfigError
    from omnikv_runtime.planner import parse_bytes, plan_memory, resolve_geometry
    from omnikv_runtime.planner.fit import DEFAULT_HEADROOM, dense_twin, fits, longest_context
    from omnikv_runtime.planner.host_tier import compare_host_tiers, host_to_device_bandwidth

    if args.headroom is None:
        args.headroom = DEFAULT_HEADROOM
    config = load_config(args.config)
    if args.host_dtype:  # validated with the rest of the config (FP8 needs offload.device = "cpu")
        data = config.to_dict()
        data["offload"]["host_dtype"] = args.host_dtype
        config = load_config(data)
    if args.tp_size is not None:
        if args.tp_size < 1:
            raise ConfigError("--tp-size", args.tp_size, "a number of GPUs of at least 1")
        config.distributed.tp_size = args.tp_size
    if args.offload_weights:
        config.distributed.offload_weights = True
    geometry = resolve_geometry(config, args.model_config)
    if args.max_position is not None:
        geometry = replace(geometry, max_positions=args.max_position)
    new_tokens = args.new_tokens or config.generation.max_new_tokens
    if args.gpu_memory:
        gpu_memory, gpu_source = parse_bytes(args.gpu_memory, "--gpu-memory"), "--gpu-memory"
    elif torch.cuda.is_available():
        gpu_memory, gpu_source = torch.cuda.get_device_properties(0).total_memory, torch.cuda.get_device_name(0)
    else:
        gpu_memory, gpu_source = DEFAULT_GPU_MEMORY, "assumed (no CUDA device here): one 80 GB card"
    if args.host_memory:
        host_memory, host_source = parse_bytes(args.host_memory, "--host-memory"), "--host-memory"
    else:
        host_memory, host_source = psutil.virtual_memory().total, "this machine"
    report: dict[str, Any] = {
        "model": {**geometry.__dict__, "parameters": geometry.param_count()},
        "context": args.context,
        "batch": args.batch,
        "new_tokens": new_tokens,
        "gpu_memory": gpu_memory,
        "gpu_memory_source": gpu_source,
        "host_memory": host_memory,
        "host_memory_source": host_source,
        "headroom": args.headroom,
        "tp_size": config.distributed.tp_size,
        "offload_weights": config.distributed.offload_weights,
    }
    max_positions = geometry.max_positions
    report["fits_model"] = {
        "max_positions": max_positions,
        "max_positions_source": "--max-position" if args.max_position is not None else "max_position_embeddings",
        "tokens": args.context + new_tokens,
        "fits": not max_positions or args.context + new_tokens <= max_positions,
    }
    variants = {"omnikv": config, "dense": dense_twin(config)} if config.omnikv.enabled else {"dense": config}
    for name, variant in variants.items():
        plan = plan_memory(geometry, variant, args.context, args.batch, new_tokens, args.dtype)
        memory_fits = fits(plan, gpu_memory, host_memory, args.headroom)
        memory_fits["positions"] = report["fits_model"]["fits"]
        memory_fits["all"] = memory_fits["all"] and memory_fits["positions"]
        report[name] = {
            **plan.as_dict(),
            "fits": memory_fits,
            "longest_context": _within_positions(
                longest_context(
                    geometry, variant, args.batch, new_tokens, gpu_memory, host_memory, args.headroom, args.dtype
                ),
                max_positions,
                new_tokens,
            ),
            "longest_context_decode_only": _within_positions(
                longest_context(
                    geometry, variant, args.batch, new_tokens, gpu_memory, host_memory, args.headroom, args.dtype, False
                ),
                max_positions,
                new_tokens,
            ),
        }
    if "omnikv" in report and config.offload.device == "cpu":
        report["omnikv"]["longest_context_by_host_dtype"] = {}
        for host_dtype in HOST_DTYPES:
            variant = config.model_copy(deep=True)
            variant.offload.host_dtype = host_dtype
            figures = {}
            for name, prefill in (("with_prefill", True), ("decode_only", False)):
                figures[name] = _within_positions(
                    longest_context(
                        geometry,
                        variant,
                        args.batch,
                        new_tokens,
                        gpu_memory,
                        host_memory,
                        args.headroom,
                        args.dtype,
                        prefill,
                    ),
                    max_positions,
                    new_tokens,
                )
            figures["host_bytes_per_token"] = plan_memory(
                geometry, variant, args.context, args.batch, new_tokens, args.dtype
            ).host_bytes_per_token
            report["omnikv"]["longest_context_by_host_dtype"][host_dtype] = figures
        bandwidth, source = host_to_device_bandwidth("cuda" if torch.cuda.is_available() else None)
        report["omnikv"]["host_tier_speed"] = compare_host_tiers(
            geometry, config, args.batch, args.context, bandwidth, source, args.dtype
        )
    report["runs"] = "omnikv" if config.omnikv.enabled else "dense"  # the run the config asks for
    report["fits"] = report[report["runs"]]["fits"]["all"]
    return report


def _gb(value: int) -> str:
    return f"{value / 1e9:9.2f} GB"


def print_report(report: dict[str, Any]) -> None:
    model = report["model"]
    print(
        f"Model: {model['num_layers']} layers, {model['num_heads']} heads ({model['kv_heads']} KV), head dim "
        f"{model['head_dim']}, hidden {model['hidden']}, {model['parameters'] / 1e9:.2f}B parameters"
    )
    print(
        f"Run: batch {report['batch']} x {report['context']} prompt tokens + {report['new_tokens']} new tokens; "
        f"GPU {report['gpu_memory'] / 1e9:.1f} GB ({report['gpu_memory_source']}), "
        f"host {report['host_memory'] / 1e9:.1f} GB ({report['host_memory_source']})"
    )
    tp_size = report.get("tp_size", 1)
    if tp_size > 1:
        print(
            f"Tensor parallel over {tp_size} GPUs: GPU figures are per GPU ({model['kv_heads'] // tp_size} of "
            f"{model['kv_heads']} KV heads in every tier); host figures are the whole host's ({tp_size} tiers)"
        )
    if report.get("offload_weights"):
        print("ZeRO-Inference: weights in pinned host memory, fetched to the GPU layer by layer")
    names = [name for name in ("dense", "omnikv") if name in report]
    weights_label = "weights in flight (ZeRO)" if report.get("offload_weights") else "weights"
    rows = [
        (weights_label + (" per GPU" if tp_size > 1 else ""), lambda p: p["weights"]),
        ("KV gpu dense layers", lambda p: p["tiers"]["gpu_dense"]),
        ("KV gpu selected (budget, offload)", lambda p: p["tiers"]["gpu_selected"]),
        ("KV gpu tail ring (new tokens)", lambda p: p["tiers"]["gpu_tail"]),
        ("KV gpu hot cache", lambda p: p["tiers"]["gpu_hot"] + p["tiers"]["gpu_hot_state"]),
        ("KV host tier (allocated)", lambda p: p["tiers"]["host_allocated"]),
        ("KV host tier (pinned, exact)", lambda p: p["tiers"]["host_reserved"]),
        ("activations, prefill chunk", lambda p: p["activations"]["prefill"]),
        ("activations, decode step", lambda p: p["activations"]["decode"]),
        ("GPU total", lambda p: p["gpu"]),
        ("host total (pinned)", lambda p: p["host"]),
    ]
    if report.get("offload_weights"):
        rows.insert(-1, ("weights on host (pinned)", lambda p: p["weights_host"]))
    if tp_size > 1:
        rows.insert(-1, ("host per rank (pinned)", lambda p: p["host_per_rank"]))
        rows[-3] = ("GPU total per GPU", lambda p: p["gpu"])
    print(f"\n{'':28}" + "".join(f"{name:>14}" for name in names))
    for label, get in rows:
        print(f"{label:28}" + "".join(f"{_gb(get(report[name])):>14}" for name in names))
    print(f"{'fits':28}" + "".join(f"{str(report[name]['fits']['all']):>14}" for name in names))
    for name in names:
        longest = report[name]["longest_context"]
        decode = report[name]["longest_context_decode_only"]
        offload = f", offload {report[name]['offload']}" if report[name]["omnikv"] else ""
        offload += f", on {tp_size} GPUs" if tp_size > 1 else ""
        print(
            f"longest context that fits, {name}{offload}: {longest['context']:,} tokens "
            f"(limited by {longest['limited_by']}); decode only, cache filled without prefill: "
            f"{decode['context']:,} (limited by {decode['limited_by']})"
        )
    for host_dtype, figures in report.get("omnikv", {}).get("longest_context_by_host_dtype", {}).items():
        longest, decode = figures["with_prefill"], figures["decode_only"]
        stored = "model dtype" if host_dtype == "auto" else host_dtype
        print(
            f"  host tier in {stored} ({figures['host_bytes_per_token']:,} bytes per token): {longest['context']:,} "
            f"tokens (limited by {longest['limited_by']}); decode only {decode['context']:,} "
            f"(limited by {decode['limited_by']})"
        )
    speed = report.get("omnikv", {}).get("host_tier_speed")
    if speed:
        from omnikv_runtime.planner.host_tier import describe_host_tiers

        print("\n".join(textwrap.wrap(describe_host_tiers(speed), 110, initial_indent="Host tier speed: ")))
    limit = report["fits_model"]
    source = limit.get("max_positions_source", "max_position_embeddings")
    hint = f" ({LONG_CONTEXT_MODEL}: Llama-3-8B's geometry with {LONG_CONTEXT_POSITIONS:,} positions)"
    if not limit["fits"]:
        print(
            f"\nDOES NOT FIT THE MODEL: {report['context']:,} prompt + {report['new_tokens']:,} new tokens = "
            f"{limit['tokens']:,} tokens, past the model's position limit of {limit['max_positions']:,} "
            f"({source}): generate refuses it, whatever the memory. Shorten the context, plan a model with a longer "
            f"one with --model-config{hint if limit['max_positions'] < LONG_CONTEXT_POSITIONS else ''}, or give a "
            "RoPE-scaled model's limit with --max-position."
        )
    elif limit["max_positions"]:
        print(
            f"(the model's position limit is {limit['max_positions']:,} tokens ({source}); "
            f"this run uses {limit['tokens']:,})"
        )
    run = report["runs"]
    if report["fits"]:
        print(f"The {run} run fits.")
    elif limit["fits"]:
        needs, usable = report[run], 1 - report["headroom"]
        short = [
            f"{needs[name] / 1e9:.2f} GB of {name.upper() if name == 'gpu' else name} memory where "
            f"{report[name + '_memory'] * usable / 1e9:.2f} GB may be used"
            for name in ("gpu", "host")
            if not needs["fits"][name]
        ]
        print(
            f"\nDOES NOT FIT IN MEMORY: the {run} run needs {' and '.join(short)} ({report['headroom']:.0%} kept "
            f"free); the longest context that fits is {needs['longest_context']['context']:,} tokens."
        )


def cmd_plan(args: argparse.Namespace) -> int:
    """Prints the plan (text, or JSON with ``--json``); exit status 1 when the config's run does not fit."""
    if args.model_config is not None:  # a mistyped --model-config is reported before torch loads
        geometry_config(args.model_config, "--model-config")
    report = build_report(args)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report)
    return 0 if report["fits"] else 1

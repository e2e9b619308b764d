"""``omnikv plan``: the memory a run needs, before anything is allocated.

    omnikv plan --config C --context 131072 --batch 4 [--gpu-memory 80GB] [--host-memory 512GB] [--json]

Prints the bytes of the weights, each KV tier and activations, whether the run
fits dense and with OmniKV, and the longest context that fits each way (for OmniKV with offload to
the host, once per host-tier dtype: the model's and FP8). The model's geometry comes
from ``--model-config`` (a config.json, an HF folder or a known name) or the config's model; no
weights are read.
"""

from __future__ import annotations

import argparse
from typing import Any

import psutil
import torch

from omnikv_runtime.config import load_config
from omnikv_runtime.planner import DTYPE_BYTES, parse_bytes, plan_memory, resolve_geometry
from omnikv_runtime.planner_fit import DEFAULT_HEADROOM, dense_twin, fits, longest_context
from omnikv_runtime.transfer.fp8 import HOST_DTYPES

DEFAULT_GPU_MEMORY = 80 * 10**9  # one H100 80 GB card, when no CUDA device is visible


def register(commands: Any) -> None:
    plan = commands.add_parser("plan", help="memory plan of a run: tiers, fits dense / OmniKV, longest context")
    plan.add_argument("--config", default="default", help="config path or bundled name (default: default)")
    plan.add_argument("--context", type=int, required=True, help="prompt tokens per sequence")
    plan.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    plan.add_argument("--new-tokens", type=int, help="tokens to generate (default: generation.max_new_tokens)")
    plan.add_argument("--gpu-memory", help="GPU memory, e.g. 80GB (default: this CUDA device, else 80GB)")
    plan.add_argument("--host-memory", help="host memory for the pinned tier, e.g. 512GB (default: this machine)")
    plan.add_argument("--model-config", help="config.json, HF folder or known name (default: the config's model)")
    plan.add_argument("--dtype", choices=sorted(DTYPE_BYTES), help="weights/KV dtype (default: model.dtype)")
    plan.add_argument(
        "--host-dtype", choices=sorted(HOST_DTYPES), help="host tier storage (default: offload.host_dtype)"
    )
    plan.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM, help="share of each memory kept free")
    plan.add_argument("--json", action="store_true", help="print one JSON object")
    plan.set_defaults(handler=cmd_plan)


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(args.config)
    if args.host_dtype:
        config.offload.host_dtype = args.host_dtype
    geometry = resolve_geometry(config, args.model_config)
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
    }
    variants = {"omnikv": config, "dense": dense_twin(config)} if config.omnikv.enabled else {"dense": config}
    for name, variant in variants.items():
        plan = plan_memory(geometry, variant, args.context, args.batch, new_tokens, args.dtype)
        report[name] = {
            **plan.as_dict(),
            "fits": fits(plan, gpu_memory, host_memory, args.headroom),
            "longest_context": longest_context(
                geometry, variant, args.batch, new_tokens, gpu_memory, host_memory, args.headroom, args.dtype
            ),
            "longest_context_decode_only": longest_context(
                geometry, variant, args.batch, new_tokens, gpu_memory, host_memory, args.headroom, args.dtype, False
            ),
        }
    if "omnikv" in report and config.offload.device == "cpu":
        report["omnikv"]["longest_context_by_host_dtype"] = {}
        for host_dtype in HOST_DTYPES:
            variant = config.model_copy(deep=True)
            variant.offload.host_dtype = host_dtype
            figures = {}
            for name, prefill in (("with_prefill", True), ("decode_only", False)):
                figures[name] = longest_context(
                    geometry,
                    variant,
                    args.batch,
                    new_tokens,
                    gpu_memory,
                    host_memory,
                    args.headroom,
                    args.dtype,
                    prefill,
                )
            figures["host_bytes_per_token"] = plan_memory(
                geometry, variant, args.context, args.batch, new_tokens, args.dtype
            ).host_bytes_per_token
            report["omnikv"]["longest_context_by_host_dtype"][host_dtype] = figures
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
    names = [name for name in ("dense", "omnikv") if name in report]
    rows = [
        ("weights", lambda p: p["weights"]),
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
    print(f"\n{'':28}" + "".join(f"{name:>14}" for name in names))
    for label, get in rows:
        print(f"{label:28}" + "".join(f"{_gb(get(report[name])):>14}" for name in names))
    print(f"{'fits':28}" + "".join(f"{str(report[name]['fits']['all']):>14}" for name in names))
    for name in names:
        longest = report[name]["longest_context"]
        decode = report[name]["longest_context_decode_only"]
        offload = f", offload {report[name]['offload']}" if report[name]["omnikv"] else ""
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
    if model.get("max_positions"):
        print(f"(the model's own position limit is {model['max_positions']:,} tokens)")


def cmd_plan(args: argparse.Namespace) -> dict[str, Any] | int:
    report = build_report(args)
    if args.json:
        return report
    print_report(report)
    return 0

"""``omnikv analyze-layers``: per-layer top-k sets, their overlap, a heatmap and suggested filter layers.

    omnikv analyze-layers --config C [--prompt-file F ...] [--count N] [--first-layer L] [--out DIR]

Without prompt files it probes built-in passkey prompts (2K tokens, the needle at 10%, 50% and 90%
depth, two keys), decoding 8 answer steps of each with the dense model. Writes ``DIR/layers.json``
(every layer's top-k per prompt and step, the IoU, mass, recall and attended matrices, the scores
of the config's plan and of the suggestion) and ``DIR/heatmap.png``. See
omnikv_runtime/eval/layer_analysis.py for what each number means.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omnikv_runtime.errors import ConfigError

if TYPE_CHECKING:  # imported by the handler: building the parser (--help) needs no torch
    import torch

logger = logging.getLogger(__name__)

SCORE = "attended"  # the metric plans are scored by (see omnikv_runtime/eval/layer_analysis.py)
PASSKEY_PROMPTS = [(2000, depth, seed) for seed in (0, 1) for depth in (0.1, 0.5, 0.9)]


def register(commands: Any) -> None:
    parser = commands.add_parser("analyze-layers", help="which layers' selections agree; suggest filter layers")
    parser.add_argument("--config", default="default", help="config path or bundled name (default: default)")
    parser.add_argument("--prompt-file", nargs="+", help="prompt files (default: built-in passkey prompts)")
    parser.add_argument("--count", type=int, help="how many filter layers to suggest (default: as in the config)")
    parser.add_argument("--first-layer", type=int, help="first filter layer (default: the config's first)")
    parser.add_argument("--steps", type=int, default=8, help="answer tokens decoded per prompt (default: 8)")
    parser.add_argument("--out", default="layer_analysis", help="output folder (default: layer_analysis)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.set_defaults(handler=cmd_analyze_layers)


def _prompts(args: argparse.Namespace, tokenizer: Any, chat: bool) -> list[tuple[str, torch.Tensor]]:
    from omnikv_runtime.eval.passkey import build_passkey_prompt

    prompts: list[tuple[str, torch.Tensor]] = []
    if args.prompt_file:
        for name in args.prompt_file:
            text = Path(name).read_text(encoding="utf-8")
            if not text.strip():
                raise ConfigError("--prompt-file", name, "a file holding a non-empty prompt")
            if chat and getattr(tokenizer, "chat_template", None):
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
                )
            ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)["input_ids"]
            prompts.append((name, ids))
        return prompts
    for length, depth, seed in PASSKEY_PROMPTS:
        text, _ = build_passkey_prompt(tokenizer, length, depth, seed=seed, use_chat_template=chat)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=not chat)["input_ids"]
        prompts.append((f"passkey {length} tokens, depth {depth}, key {seed}", ids))
    return prompts


def _rounded(matrix: torch.Tensor) -> list[list[float]]:
    return [[round(float(x), 4) for x in row] for row in matrix]


def cmd_analyze_layers(args: argparse.Namespace) -> int:
    from omnikv_runtime import progress
    from omnikv_runtime.cli.threads import apply_cpu_threads
    from omnikv_runtime.config import load_config
    from omnikv_runtime.eval.layer_analysis import (
        mean_metrics,
        plan_score,
        probe_layers,
        save_heatmaps,
        suggest_filter_layers,
    )
    from omnikv_runtime.geometry import ModelGeometry
    from omnikv_runtime.models import load_configured_model
    from omnikv_runtime.policies import make_selection_policy

    config = load_config(args.config)
    section = config.omnikv
    first = section.filter_layers[0] if args.first_layer is None else args.first_layer
    count = len(section.filter_layers) if args.count is None else args.count
    if first < 0:
        raise ConfigError("--first-layer", first, "a layer index of at least 0")
    if count < 1:
        raise ConfigError("--count", count, "at least 1 filter layer")
    if args.steps < 1:
        raise ConfigError("--steps", args.steps, "at least 1 decode step")
    apply_cpu_threads(config.model.cpu_num_threads, config.model.device)
    model, tokenizer = load_configured_model(config)
    layers = ModelGeometry.from_model(model).num_layers
    if not 0 <= first < layers:
        raise ConfigError("--first-layer", first, f"a layer index in 0..{layers - 1}")
    if not 1 <= count <= layers - first:
        raise ConfigError("--count", count, f"1..{layers - first} filter layers from layer {first}")
    policy = make_selection_policy(section.selector.policy_arguments())
    probes, per_prompt = [], []
    prompts = _prompts(args, tokenizer, config.generation.use_chat_template)
    bar = progress.bar(len(prompts), "probing prompts", unit="prompt")
    for name, ids in prompts:
        budget = section.token_budget_for(ids.shape[1])
        logger.info("probing %s (%d tokens, top-%d)", name, ids.shape[1], budget)
        probe = probe_layers(model, ids, policy, budget, steps=args.steps, pad_token_id=tokenizer.pad_token_id)
        probes.append(probe)
        per_prompt.append(
            {"prompt": name, "tokens": probe.context_len, "top_k": [s.tolist() for s in probe.selections]}
        )
        bar.update(1)
    bar.close()
    metrics = mean_metrics(probes)
    suggested = suggest_filter_layers(metrics[SCORE], count, first, section.wait_layers)
    configured = plan_score(metrics[SCORE], section.filter_layers, section.wait_layers)
    best = plan_score(metrics[SCORE], suggested, section.wait_layers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "config": args.config,
        "selector": policy.name,
        "wait_layers": section.wait_layers,
        "score": SCORE,
        "config_filter_layers": section.filter_layers,
        "config_plan": configured,
        "suggested_filter_layers": suggested,
        "suggested_plan": best,
        "agree": suggested == section.filter_layers,
        "heatmap": str(out / "heatmap.png"),
        "json": str(out / "layers.json"),
    }
    report = {**summary, "metrics": {k: _rounded(v) for k, v in metrics.items()}, "prompts": per_prompt}
    (out / "layers.json").write_text(json.dumps(report) + "\n", encoding="utf-8")
    save_heatmaps(metrics, str(out / "heatmap.png"), marked=suggested)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"probed {len(probes)} prompt(s) with the '{policy.name}' selector")
    print(
        f"config filter layers    {section.filter_layers}: mean attended-mass recall {configured['mean']:.3f}, "
        f"worst {configured['worst']:.3f} (layer {configured['worst_layer']})"
    )
    print(
        f"suggested filter layers {suggested}: mean attended-mass recall {best['mean']:.3f}, "
        f"worst {best['worst']:.3f} (layer {best['worst_layer']})"
    )
    print(f"the config {'agrees' if summary['agree'] else 'differs'}; wrote {summary['json']} and {summary['heatmap']}")
    return 0

"""What one generation did, in words that hold on every device: the report of ``omnikv generate``.

The cache names its tiers ``gpu_dense``, ``gpu_selected``, ... after where they live on a CUDA
machine. Reports name them by role and print the device they are on, so a CPU run does not claim
a GPU. A run of a config with ``omnikv.enabled = false`` is reported as dense. When the token
budget covers the whole prompt, every sparse layer attends to all of it (as dense attention
does), but its KV still lives in the host tier and is fetched again at each step: the report says
so, next to the bytes that moved. Below that, it says which share of the context the sparse layers
attended to, and that the output can then differ from dense attention's. It counts the decode steps
that ran after the answer had ended (the loop looks for the end every ``generation.check_every``
tokens and drops what came after it), so the steps and the new tokens add up. With the sparse
layers' KV in host memory it says which host tier (the model's dtype or FP8) would make the run's
decode steps faster, with the bytes each moves over PCIe, the bandwidth and where it comes from.
"""

from __future__ import annotations

import textwrap
from typing import Any

from omnikv_runtime.geometry import ModelGeometry
from omnikv_runtime.planner import DTYPE_BYTES
from omnikv_runtime.planner.host_tier import compare_host_tiers, describe_host_tiers, host_to_device_bandwidth

# cache tier key -> what the tier is
TIER_LABELS = {
    "gpu_dense": "dense layers",
    "gpu_selected": "selected-row buffers",
    "gpu_tail": "tail ring",
    "gpu_hot": "hot cache",
    "host": "host tier, used",
    "host_allocated": "host tier, allocated",
}
# cache tier key -> key of the CLI's JSON report (no device in the name)
_JSON_KEYS = {
    "gpu_dense": "dense",
    "gpu_selected": "selected",
    "gpu_tail": "tail",
    "gpu_hot": "hot",
    "host": "host",
    "host_allocated": "host_allocated",
}


def tier_label(tier: str, compute_device: str | None = None, host_device: str | None = None) -> str:
    """A tier key as words with its device: ``gpu_dense`` on a CPU run is ``dense layers (cpu)``."""
    label = TIER_LABELS.get(tier, tier)
    device = host_device if tier.startswith("host") else compute_device
    return f"{label} ({device})" if device else label


def attended_shares(stats: dict[str, Any]) -> list[float]:
    """For each filter layer, the share of the context its sparse layers attended to in a step (the
    most tokens it selected in any step, over the context), from an engine's ``stats()``."""
    context = stats.get("context_tokens") or 0
    if not context:
        return []
    return [min(max(steps), context) / context for steps in stats.get("selected_per_step", {}).values() if steps]


def attended_note(shares: list[float]) -> str | None:
    """One line: the share of the context the sparse layers attended to, and what that means for the
    output; None when there is no selection or it covered the whole context (dense attention)."""
    if not shares or min(shares) >= 1:
        return None
    low, high = min(shares), max(shares)
    share = f"{low:.1%}" if low == high else f"{low:.1%} to {high:.1%}"
    return (
        f"sparse layers attended to {share} of the context a step (plus the new tokens); below a token budget "
        "of 1.0 the output can differ from dense attention's"
    )


def _dense_reason(engine: Any) -> str:
    if not engine.config.omnikv.enabled:
        return "omnikv.enabled = false"
    return "the layer plan has no sparse layer"


def summarize_run(engine: Any, prompt_tokens: int, answer: str) -> dict[str, Any]:
    """The JSON report of an engine's last generate call."""
    stats = engine.stats()
    memory = engine.memory_report()
    selected = {layer: (max(steps) if steps else 0) for layer, steps in stats.get("selected_per_step", {}).items()}
    context = stats.get("context_tokens", prompt_tokens)
    enabled = engine.config.omnikv.enabled and bool(engine.plan.sparse_layers)
    tiers = {_JSON_KEYS.get(key, key): value for key, value in memory["tiers"].items()}
    steps, new_tokens = stats.get("decode_steps", 0), stats.get("new_tokens")
    return {
        "answer": answer.strip(),
        "runs": "omnikv" if enabled else "dense",
        "dense_because": None if enabled else _dense_reason(engine),
        "prompt_tokens": prompt_tokens,
        "new_tokens": new_tokens,
        "decode_steps": steps,  # steps run: the first new token comes from the prefill
        "decode_steps_after_end": max(0, steps - (new_tokens - 1)) if new_tokens else 0,
        "attended_share": [round(share, 4) for share in attended_shares(stats)] if enabled else [],
        "plan": stats["plan"],
        "compute_device": memory["compute_device"],
        "offload": engine.config.offload.device,  # "cpu": the sparse layers' KV in host memory; "none": on the device
        "host_tier_device": memory["host_tier_device"],
        "token_budget": engine.config.omnikv.token_budget_for(context) if enabled else None,
        "selected_tokens_per_step": selected,
        # the budget covered the whole prompt: attention was dense, the tiers and fetches were not
        "whole_context_selected": bool(selected) and min(selected.values()) >= context,
        "bytes": {**tiers, **stats["transfer"]},
        "prefill_seconds": round(stats.get("prefill_seconds", 0.0), 3),
        "decode_seconds": round(stats.get("decode_seconds", 0.0), 3),
        "host_tier_speed": host_tier_speed(engine, stats.get("batch", 1), context) if enabled else None,
    }


def host_tier_speed(engine: Any, batch: int, context: int) -> dict[str, Any] | None:
    """Which host tier (the model's dtype or FP8) would make this run's decode steps faster, by the bytes
    each moves over PCIe (:func:`~omnikv_runtime.planner.host_tier.compare_host_tiers`; a report only)."""
    dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")
    bandwidth, source = host_to_device_bandwidth(engine.device)
    geometry = ModelGeometry.from_model(engine.model)
    return compare_host_tiers(
        geometry, engine.config, batch, context, bandwidth, source, dtype if dtype in DTYPE_BYTES else None
    )


def _mib(value: int) -> str:
    return f"{value / 2**20:.2f} MiB"


def run_lines(name: str, run: dict[str, Any]) -> list[str]:
    """The text report of one run (a :func:`summarize_run` dict)."""
    lines = [f"[{name}] layers {run['plan']} (D dense, F filter, W wait, s sparse)"]
    if run["runs"] == "dense":
        lines.append(f"  attention            dense in every layer ({run['dense_because']})")
    steps, after_end = run["decode_steps"], run.get("decode_steps_after_end", 0)
    tokens = f"  prompt tokens        {run['prompt_tokens']}, new tokens {run['new_tokens']} in {steps} decode steps"
    lines.append(tokens + (f", {after_end} of them after the answer had ended" if after_end else ""))
    selected = run["selected_tokens_per_step"]
    if selected:
        per_layer = ", ".join(f"layer {k}: {v}" for k, v in selected.items())
        whole = run["whole_context_selected"]
        lines.append(f"  selected per step    {per_layer}" + (" (the whole context)" if whole else " tokens"))
    if run["whole_context_selected"]:
        lines.append(
            "  note                 the prompt is within the token budget: the sparse layers attended to all of it,"
        )
        lines.append(
            "                       as dense does, but their KV is still kept in the host tier and fetched each step"
        )
    note = attended_note(run.get("attended_share", []))
    if note:
        wrapped = textwrap.wrap(note, 96)
        lines += [f"  note                 {wrapped[0]}", *(f"{'':23}{line}" for line in wrapped[1:])]
    tiers, device, host = run["bytes"], run["compute_device"], run["host_tier_device"]
    on_device = [f"dense layers {_mib(tiers.get('dense', 0))}"]
    if run["runs"] == "omnikv":
        on_device += [
            f"selected-row buffers {_mib(tiers.get('selected', 0))}",
            f"tail ring {_mib(tiers.get('tail', 0))}",
        ]
        if tiers.get("hot"):
            on_device.append(f"hot cache {_mib(tiers['hot'])}")
    lines.append(f"  KV on {device:<14} {', '.join(on_device)}")
    if run["runs"] == "omnikv":
        where = f"host tier ({host})" if run["offload"] == "cpu" else f"full KV ({host})"
        sparse = run["plan"].count("s")
        lines.append(f"  {where:<20} {_mib(tiers.get('host', 0))}: every token of the {sparse} sparse layers")
        per_step = f" ({_mib(tiers['bytes_fetched'] // steps)} a step)" if steps else ""
        lines.append(
            f"  fetched / written    {_mib(tiers['bytes_fetched'])} in {steps} decode steps{per_step} / "
            f"{_mib(tiers['bytes_written'])}"
        )
    lines.append(f"  prefill / decode     {run['prefill_seconds']:.2f} s / {run['decode_seconds']:.2f} s")
    if run.get("host_tier_speed"):
        wrapped = textwrap.wrap(describe_host_tiers(run["host_tier_speed"]), 96)
        lines += [f"  host tier speed      {wrapped[0]}", *(f"{'':23}{line}" for line in wrapped[1:])]
    return lines

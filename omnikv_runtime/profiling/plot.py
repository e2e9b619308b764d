"""The profiler's PNG timeline, drawn from report.json (here, or later on another machine).

Three panels over time: process memory (GPU allocated/reserved per device, host RSS, pinned), KV
bytes per tier, and fetch bandwidth of the filter layers' selected rows (OmniKV, Hao et al., ICLR
2025); prefill forwards are shaded and decode steps ticked. Needs matplotlib (the ``plot`` extra);
without it, :func:`plot_report` warns and returns False, and ``omnikv profile-plot report.json``
draws it later.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from omnikv_runtime.profiling.run_report import TIER_LABELS

logger = logging.getLogger(__name__)

_TIERS = ("gpu_dense", "gpu_selected", "gpu_tail", "gpu_hot", "host")


def plot_report(report: dict[str, Any] | str | Path, path: str | Path) -> bool:
    """Draw the timeline of ``report`` (a dict or a report.json path) into ``path``; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(
            "matplotlib is not installed: no PNG timeline; run `omnikv profile-plot report.json` where it is "
            "(pip install 'omnikv-runtime[plot]')"
        )
        return False
    if not isinstance(report, dict):
        report = json.loads(Path(report).read_text(encoding="utf-8"))
    samples, marks = report["samples"], report["marks"]
    compute = "GPU" if any(s.get("gpu") for s in samples) else "CPU"
    times = [s["t"] for s in samples]
    figure, (memory, tiers, bandwidth) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    gib = 2**30
    for device in sorted({d for s in samples for d in s.get("gpu", {})}):
        rows = [s.get("gpu", {}).get(device, {}) for s in samples]
        memory.plot(times, [r.get("allocated", 0) / gib for r in rows], label=f"GPU {device} allocated")
        memory.plot(times, [r.get("reserved", 0) / gib for r in rows], label=f"GPU {device} reserved", ls="--")
    memory.plot(times, [s["host_rss"] / gib for s in samples], label="host RSS")
    memory.plot(times, [s["pinned"] / gib for s in samples], label="pinned (host tier)")
    memory.set_ylabel("GiB")
    memory.set_title("process memory")
    for tier in _TIERS:
        values = [s["tiers"].get(tier, 0) / gib for s in samples]
        if any(values):
            tiers.plot(times, values, label=TIER_LABELS.get(tier, tier))
    tiers.set_ylabel("GiB")
    tiers.set_title(f"KV bytes per tier (compute device: {compute})")
    fetches = [m for m in marks if m["kind"] == "fetch"]
    if fetches:
        starts = [m["start"] for m in fetches]
        rates = [m["bytes"] / max(m["end"] - m["start"], 1e-9) / 1e9 for m in fetches]
        bandwidth.vlines(starts, 0, rates, color="tab:purple", label="per fetch (launch to return)")
    cumulative = [s["transfer"]["bytes_fetched"] for s in samples]
    rates = [0.0] + [
        max(cumulative[i] - cumulative[i - 1], 0) / max(times[i] - times[i - 1], 1e-9) / 1e9
        for i in range(1, len(samples))
    ]
    bandwidth.plot(times, rates, color="tab:green", label="between samples")
    bandwidth.set_ylabel("GB/s")
    bandwidth.set_xlabel("seconds")
    bandwidth.set_title(f"fetch bandwidth (selected rows, host tier to {compute})")
    for axis in (memory, tiers, bandwidth):
        for mark in marks:
            if mark["kind"] == "prefill":
                axis.axvspan(mark["start"], mark["end"], color="tab:orange", alpha=0.12, lw=0)
            elif mark["kind"] == "decode":
                axis.axvline(mark["start"], color="gray", alpha=0.25, lw=0.5)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7, loc="upper left")
    meta = report.get("meta", {})
    figure.suptitle(f"OmniKV memory timeline ({meta.get('device', '')}, {meta.get('date', '')}); shaded: prefill")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return True

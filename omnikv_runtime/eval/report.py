"""``omnikv eval-report``: compare run directories as a markdown table and a PNG bar chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omnikv_runtime.eval.data import EvalDataError


def load_run(run_dir: str | Path) -> dict[str, Any]:
    """A run's ``results.json`` plus its label (the directory name)."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise EvalDataError(f"{path}: file not found (is {run_dir} a directory written by `omnikv eval`?)")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvalDataError(f"{path}, line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(results, dict) or not isinstance(results.get("tasks"), dict):
        raise EvalDataError(f"{path}: missing field 'tasks' (not a results file of `omnikv eval`)")
    return {"label": Path(run_dir).resolve().name, **results}


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """Tasks as rows, runs as columns, an average row; failed tasks show as 'failed'."""
    tasks: list[str] = []
    for run in runs:
        tasks += [t for t in [*run["tasks"], *run.get("failed", {})] if t not in tasks]
    lines = [
        "| task | metric | " + " | ".join(run["label"] for run in runs) + " |",
        "|---|---|" + "---:|" * len(runs),
    ]
    for task in tasks:
        metric = next((run["tasks"][task]["metric"] for run in runs if task in run["tasks"]), "")
        cells = []
        for run in runs:
            if task in run["tasks"]:
                entry = run["tasks"][task]
                cells.append(_cell(entry["score"]) + (f" ({entry['errors']} err)" if entry.get("errors") else ""))
            else:
                cells.append("failed" if task in run.get("failed", {}) else "—")
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    lines.append("| **average** | | " + " | ".join(f"**{_cell(run.get('average'))}**" for run in runs) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(runs: list[dict[str, Any]], path: str | Path) -> Path:
    """A grouped bar chart (one group per task, one bar per run) saved as PNG; needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvalDataError("the PNG chart needs matplotlib: pip install matplotlib (or use --no-chart)") from None
    tasks: list[str] = []
    for run in runs:
        tasks += [t for t in run["tasks"] if t not in tasks]
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(tasks) * max(1, len(runs)) / 2 + 2), 4.0))
    for i, run in enumerate(runs):
        values = [(run["tasks"].get(t) or {}).get("score") or 0.0 for t in tasks]
        positions = [k + (i - (len(runs) - 1) / 2) * width for k in range(len(tasks))]
        ax.bar(positions, values, width=width, label=run["label"])
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_ylabel("score (0-100: the task's metric as a percentage)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    ax.set_title("omnikv eval: " + ", ".join(sorted({run.get("benchmark", "?") for run in runs})))
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out

"""CI runs exactly the README's test command, then ruff over the tree."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command_then_ruff():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    test_command = next(line for line in commands if line.endswith("python -m pytest"))
    steps = [line for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines() if line[:1] not in "#"]
    assert steps[-2:] == [test_command, "python -m ruff check . && python -m ruff format --check ."]

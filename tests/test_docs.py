"""The README and docs/ say what is true: their `omnikv plan` examples plan a run that fits, the
README's test count is the suite's, and the files and modules they name exist."""

from __future__ import annotations

import importlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from omnikv_runtime import cli
from omnikv_runtime.geometry import KNOWN_GEOMETRIES

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEFAULT_MARKS = "not gpu and not slow"  # pyproject's addopts


def _command_lines(text: str) -> list[str]:
    """The command lines of the fenced code blocks (a `$ ` prompt dropped, `\\` continuations joined)."""
    lines: list[str] = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL):
        joined = re.sub(r"\\\n\s*", " ", block)
        lines += [line.strip().removeprefix("$ ") for line in joined.splitlines()]
    return lines


def _plan_examples() -> list[tuple[str, str]]:
    return [
        (path.name, line)
        for path in DOCS
        for line in _command_lines(path.read_text(encoding="utf-8"))
        if line.startswith("omnikv plan ")
    ]


def test_every_plan_example_in_the_docs_plans_a_run_that_fits(tmp_path, capsys):
    examples = _plan_examples()
    assert len(examples) >= 4, examples  # memory.md's three, multi_gpu.md's, the README's
    geometry = tmp_path / "config.json"  # stands for the examples' path/to/config.json
    geometry.write_text(__import__("json").dumps(KNOWN_GEOMETRIES["llama3.1-8b"]))
    for where, line in examples:
        argv = [word for word in shlex.split(line, comments=True)[2:] if word != "[--json]"]
        argv = [str(geometry) if word.startswith("path/to/") else word for word in argv]
        code = cli.main(["plan", *argv])
        out = capsys.readouterr().out
        assert code == 0, f"{where}: `{line}` exits {code}:\n{out}"
        assert "DOES NOT FIT" not in out and out.rstrip().endswith("run fits."), f"{where}: `{line}`:\n{out}"


def _collected_default_suite(config: pytest.Config, session: pytest.Session) -> int:
    """How many tests the default `python -m pytest` runs: this session's own count when it is that
    run (no paths, keywords, deselections or other marks), else a `--collect-only` of it."""
    option = config.option
    whole = (
        config.args_source == pytest.Config.ArgsSource.TESTPATHS
        and not option.keyword
        and option.markexpr == DEFAULT_MARKS
        and not option.deselect
        and not getattr(option, "lf", False)
    )
    if whole:
        return len(session.items)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    counts = re.search(r"^(\d+)(?:/\d+)? tests? collected", done.stdout, flags=re.MULTILINE)
    assert counts, done.stdout[-2000:] + done.stderr[-2000:]
    return int(counts.group(1))


def test_the_readme_test_count_is_the_suites(request):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    stated = re.findall(r"\(([\d,]+) tests; slow and GPU tests are left out by default\)", readme)
    assert len(stated) == 1, "the README's durations table states the suite's test count once"
    collected = _collected_default_suite(request.config, request.session)
    assert int(stated[0].replace(",", "")) == collected, f"README says {stated[0]} tests, the suite has {collected}"


# code folders whose files the docs name (configs/ is left out: the docs also name the original
# OmniKV code's own configs/example.json); a name cut by a wildcard or a {a,b} list is not one file
_PATHS = re.compile(
    r"\b(?:benchmarks|tests|omnikv_runtime|scripts|policies|transfer|docs)/[\w./-]*\w(?![\w/*{<-]|\.\w)"
)


def test_files_and_modules_the_docs_name_exist():
    missing = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for named in sorted(set(_PATHS.findall(text))):
            if not (ROOT / named).exists() and not list(ROOT.glob(f"{named}.*")):  # or an output prefix
                missing.append(f"{path.name}: {named}")
        for dotted in sorted(set(re.findall(r"\bomnikv_runtime(?:\.\w+)+", text))):
            if not _resolves(dotted):
                missing.append(f"{path.name}: {dotted}")
    assert not missing, missing


def _resolves(dotted: str) -> bool:
    """Whether ``a.b.c`` is a module, or an attribute reached from the longest module prefix."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            if not hasattr(found, name):
                return False
            found = getattr(found, name)
        return True
    return False

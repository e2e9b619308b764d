"""What a newcomer still met in the first hour: `omnikv run` and the CPU thread rule, plans that say
by their exit status whether they fit, typos answered before torch loads, reports that agree with
themselves and say how much of the context the sparse layers saw, and no output folder left
untracked in the clone."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from okv_testlib import PROMPT_LEN, make_model, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime import cli, progress
from omnikv_runtime.cli import threads as cpu_threads
from omnikv_runtime.config import load_config
from omnikv_runtime.geometry import KNOWN_GEOMETRIES, ModelGeometry
from omnikv_runtime.planner import plan_memory
from omnikv_runtime.profiling.run_report import run_lines, summarize_run

ROOT = Path(__file__).resolve().parents[1]

# prints torch's threads as the script starts; with arguments, sets its own, generates with a model
# the launcher wrapped, and prints them again
_THREADS_SCRIPT = """
import sys, torch
print("start", torch.get_num_threads())
if len(sys.argv) > 1:
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(int(sys.argv[1]))
    model = AutoModelForCausalLM.from_pretrained(sys.argv[2])
    model.generate(torch.arange(1, 41)[None], max_new_tokens=3, do_sample=False)
    print("end", torch.get_num_threads(), "generate" in vars(model))
"""


@pytest.fixture
def threads_left_alone(monkeypatch):
    """No OMP_NUM_THREADS, two usable cores, torch at 2 threads; torch's count restored afterwards."""
    before = torch.get_num_threads()
    monkeypatch.delenv(cpu_threads.THREADS_ENV, raising=False)
    monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _printed(out: str) -> list[str]:
    """The script's own lines (a library may print too: DeepSpeed names its accelerator on stdout)."""
    return [word for line in out.splitlines() if line.split()[:1] in (["start"], ["end"]) for word in line.split()]


def test_run_applies_the_thread_rule_before_the_script_and_the_script_still_wins(threads_left_alone, tmp_path, capsys):
    script = tmp_path / "threads.py"
    script.write_text(_THREADS_SCRIPT)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(omni(8, model={"device": "cpu"})))
    assert cli.main(["run", "--config", str(config), str(script)]) == 0
    assert _printed(capsys.readouterr().out) == ["start", "1"]  # one core left to the rest of the machine

    config.write_text(json.dumps(omni(8, model={"device": "cpu", "cpu_num_threads": 3})))
    assert cli.main(["run", "--config", str(config), str(script)]) == 0
    assert _printed(capsys.readouterr().out) == ["start", "3"]  # the config's count

    make_model("llama").save_pretrained(tmp_path / "model")
    assert cli.main(["run", "--config", str(config), str(script), "2", str(tmp_path / "model")]) == 0
    captured = capsys.readouterr()
    assert _printed(captured.out) == ["start", "3", "end", "2", "True"]  # the script's own count, through OmniKV
    # the end-of-run line: 8 of the 40 prompt tokens a step
    note = "omnikv run: LlamaForCausalLM, 1 generate call: sparse layers attended to 20.0% of the context a step"
    assert note in captured.err and "can differ from dense attention" in captured.err


# each command's mistakes in one child process; then whether torch or transformers was imported
_TYPO_PROBE = """
import contextlib, io, json, sys
from omnikv_runtime.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    results.append([code, err.getvalue()])
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print(json.dumps({"heavy": heavy, "results": results}))
"""


def test_typos_are_answered_before_torch_is_imported(tmp_path):
    mistakes = [  # the mistake each error must name, and the command line
        ("nope.json", ["generate", "--config", "nope.json"]),
        ("nope.json", ["plan", "--context", "9", "--model-config", "nope.json"]),
        ("llama31-8b", ["plan", "--context", "9", "--model-config", "llama31-8b"]),
        ("nope.json", ["run", "--config", "nope.json", "script.py"]),
        ("defualt", ["analyze-layers", "--config", "defualt"]),
        ("missing.txt", ["generate", "--prompt-file", "missing.txt"]),
        ("missing.py", ["run", "missing.py"]),
    ]
    done = subprocess.run(
        [sys.executable, "-c", _TYPO_PROBE, json.dumps([argv for _, argv in mistakes])],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout)
    assert probe["heavy"] == []
    for (mistake, argv), (code, err) in zip(mistakes, probe["results"]):
        assert code == 2, (argv, err)
        assert "no such file" in err.lower() and "is not allowed" not in err, (argv, err)
        assert mistake in err, (argv, err)
    config_error = probe["results"][0][1]
    assert "'--config' = 'nope.json': no such file" in config_error and "bundled config name (default" in config_error
    assert "did you mean 'llama3.1-8b'?" in probe["results"][2][1]
    assert "did you mean 'default'?" in probe["results"][4][1]


def test_plan_exit_status_says_whether_the_run_fits(capsys):
    argv = ["plan", "--model-config", "smollm2-135m", "--gpu-memory", "80GB", "--host-memory", "512GB"]
    assert cli.main([*argv, "--context", "131072"]) == 1  # past the position limit of 8,192
    assert "DOES NOT FIT THE MODEL" in capsys.readouterr().out
    assert cli.main([*argv, "--context", "131072", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["runs"] == "omnikv" and report["fits"] is False
    assert cli.main([*argv, "--context", "131072", "--max-position", "262144", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is True and report["fits_model"]["max_positions"] == 262144
    assert report["fits_model"]["max_positions_source"] == "--max-position"
    assert cli.main([*argv, "--context", "4096"]) == 0
    assert capsys.readouterr().out.rstrip().endswith("The omnikv run fits.")
    assert cli.main([*argv[:3], "--gpu-memory", "0.1GB", "--context", "4096"]) == 1  # memory, not positions
    text = capsys.readouterr().out
    assert (
        "DOES NOT FIT IN MEMORY: the omnikv run needs" in text and "GB of GPU memory where 0.10 GB may be used" in text
    )


def test_llama31_is_llama3_with_128k_positions():
    config = load_config("llama3_8b")
    llama3, llama31 = (ModelGeometry.from_hf_config(KNOWN_GEOMETRIES[name]) for name in ("llama3-8b", "llama3.1-8b"))
    assert llama3.max_positions == 8192 and llama31.max_positions == 131072
    assert plan_memory(llama3, config, 8000).as_dict() == plan_memory(llama31, config, 8000).as_dict()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(scope="module")
def early_end():
    """An engine and a run whose answer ends (at an end-of-sequence token) before the loop first looks."""
    engine = okv.initialize(make_model("llama"), omni(budget=8))
    ids, mask = make_prompt(1)
    free = engine.generate(ids, attention_mask=mask, max_new_tokens=32)[0, PROMPT_LEN:].tolist()
    eos = free[4]
    return engine, ids, mask, eos, free.index(eos) + 1  # tokens up to and with the first eos


def test_the_decode_bar_closes_at_the_tokens_generated(monkeypatch, early_end):
    engine, ids, mask, eos, answer = early_end
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    progress.enable_progress_bars()
    try:
        output = engine.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=eos)
    finally:
        progress.disable_progress_bars()
    assert output.shape[1] - PROMPT_LEN == answer <= 5
    last_draw = terminal.getvalue().rsplit("decode:", 1)[1]
    assert f"| {answer}/{answer} [" in last_draw, last_draw


def test_steps_and_new_tokens_agree_in_the_text_and_the_json(early_end):
    engine, ids, mask, eos, answer = early_end
    engine.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=eos)
    run = summarize_run(engine, PROMPT_LEN, "")
    steps = engine.stats()["decode_steps"]
    check_every = engine.config.generation.check_every
    assert steps == check_every  # the loop ran to its first look for the end
    assert run["decode_steps"] == steps and run["new_tokens"] == answer
    assert run["decode_steps_after_end"] == steps - (answer - 1) > 0
    text = "\n".join(run_lines("omnikv", run))
    assert f"new tokens {answer} in {steps} decode steps, {steps - answer + 1} of them after the answer had" in text
    assert f"in {steps} decode steps (" in text  # the bytes fetched are over the same steps
    assert json.loads(json.dumps(run)) == run  # what --json prints is this same dict
    engine.generate(ids, attention_mask=mask, max_new_tokens=6)  # no early end: nothing to explain
    run = summarize_run(engine, PROMPT_LEN, "")
    assert run["decode_steps"] == 5 and run["decode_steps_after_end"] == 0
    assert "after the answer" not in "\n".join(run_lines("omnikv", run))


def test_the_report_says_how_much_of_the_context_was_attended(early_end):
    engine, ids, mask, _, _ = early_end
    engine.generate(ids, attention_mask=mask, max_new_tokens=4)
    run = summarize_run(engine, PROMPT_LEN, "")
    assert run["attended_share"] == [8 / PROMPT_LEN, 8 / PROMPT_LEN]  # budget 8 of 40, both filter layers
    text = " ".join(" ".join(run_lines("omnikv", run)).split())
    assert "note sparse layers attended to 20.0% of the context a step (plus the new tokens)" in text
    assert "below a token budget of 1.0 the output can differ from dense attention" in text
    whole = okv.initialize(make_model("llama"), omni(budget=64))  # the whole prompt: dense attention, no note
    whole.generate(ids, attention_mask=mask, max_new_tokens=4)
    run = summarize_run(whole, PROMPT_LEN, "")
    assert run["attended_share"] == [1.0, 1.0] and "can differ" not in "\n".join(run_lines("omnikv", run))


def test_memory_report_after_generate_holds_the_planned_tiers(early_end):
    """Every path leaves the report on the tiers the run used: the engine's loop, its reuse by a call
    of the same shape (the cache emptied, then filled again), and transformers' generate step by step."""
    engine, ids, mask, _, _ = early_end
    geometry = ModelGeometry.from_hf_config(engine.model.config)
    plan = plan_memory(geometry, engine.config, PROMPT_LEN, 1, 6).tiers
    for kwargs in ({}, {}, {"repetition_penalty": 1.1}):
        engine.generate(ids, attention_mask=mask, max_new_tokens=6, **kwargs)
        tiers = engine.memory_report()["tiers"]
        for tier in ("gpu_dense", "gpu_selected", "gpu_tail", "host_allocated"):
            assert tiers[tier] == plan[tier] > 0, (kwargs, tier)
        assert 0 < tiers["host"] <= tiers["host_allocated"]


def test_default_output_folders_are_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    folders = []
    for command in ("analyze-layers", "profile"):
        (out,) = [action for action in commands[command]._actions if "--out" in action.option_strings]
        folders.append(out.default)
    folders.append("eval_runs")  # eval's default run directories: eval_runs/<benchmark>-<config>
    done = subprocess.run(
        ["git", "check-ignore", *[f"{folder}/x" for folder in folders]], cwd=ROOT, capture_output=True, text=True
    )
    assert done.stdout.split() == [f"{folder}/x" for folder in folders]

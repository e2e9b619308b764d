"""What a new user meets first: a fast --help/--version, progress bars, the CPU thread default, reports
that say what happened (device, dense runs, prompts inside the budget), and plans past the model's
position limit."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch
from okv_testlib import PROMPT_LEN, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime import cli, progress
from omnikv_runtime.cli import threads as cpu_threads
from omnikv_runtime.planner.fit import DEFAULT_HEADROOM
from omnikv_runtime.profiling.run_report import run_lines, summarize_run, tier_label

# every --help, and --version, in one child process; then which heavy modules it imported
_HELP_PROBE = """
import contextlib, io, json, sys
from omnikv_runtime.cli import COMMAND_MODULES, build_parser, main
commands = list(build_parser()._subparsers._group_actions[0].choices)
texts = {}
for argv in [["--help"], ["--version"], *[[name, "--help"] for name in commands]]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(argv)
        except SystemExit as stop:
            assert stop.code == 0, (argv, stop.code)
    texts[" ".join(argv)] = out.getvalue()
heavy = sorted(m for m in ("torch", "transformers", "numpy", "safetensors") if m in sys.modules)
print(json.dumps({"heavy": heavy, "texts": texts}))
"""


@pytest.fixture(scope="module")
def help_texts() -> dict:
    done = subprocess.run([sys.executable, "-c", _HELP_PROBE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_help_and_version_import_neither_torch_nor_transformers(help_texts):
    assert help_texts["heavy"] == []
    texts = help_texts["texts"]
    assert {"--help", "--version", "generate --help", "plan --help", "eval --help", "run --help"} <= set(texts)
    assert texts["--version"].startswith(f"omnikv-runtime {okv.__version__} (torch ")
    assert f"transformers {__import__('transformers').__version__}" in texts["--version"]


def test_help_shows_defaults_and_the_environment(help_texts):
    texts = help_texts["texts"]
    assert f"(default: {DEFAULT_HEADROOM})" in texts["plan --help"]
    flat = " ".join(texts["eval --help"].split())
    for option in ("--world-size WORLD_SIZE", "--samples SAMPLES", "--seed SEED"):
        assert option in flat
    assert "default: 1)" in flat and "(default: 0)" in flat
    assert "OMNIKV_RUN_STATS" in texts["run --help"] and "OMNIKV_MODEL_CACHE" in texts["run --help"]
    for command in ("generate", "run", "profile", "eval", "analyze-layers"):
        assert "--quiet" in texts[f"{command} --help"], command


def test_the_package_imports_its_names_on_first_use():
    done = subprocess.run(
        [sys.executable, "-c", "import sys, omnikv_runtime as okv; print('torch' in sys.modules, okv.__version__)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split() == ["False", okv.__version__]
    assert okv.Engine.__module__ == "omnikv_runtime.engine" and okv.launcher.Launcher  # a name, a submodule
    assert "Engine" in dir(okv)
    with pytest.raises(AttributeError, match="no attribute 'Engnie'"):
        okv.Engnie  # noqa: B018


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def bars_on():
    progress.enable_progress_bars()
    yield
    progress.disable_progress_bars()


def test_generate_draws_prefill_and_decode_bars_with_a_time_left(bars_on, monkeypatch, tiny_llama):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)  # in the test: pytest resets stderr between setup and call
    engine = okv.initialize(tiny_llama, omni(budget=16, prefill={"chunk_size": 16}))
    ids, mask = make_prompt(1)
    engine.generate(ids, attention_mask=mask, max_new_tokens=6)
    drawn = terminal.getvalue()  # each bar is drawn when it opens, then at most every 0.1 s, then erased
    assert "prefill:   0%|" in drawn and f"0/{PROMPT_LEN} [00:00<?" in drawn  # [elapsed<time left]
    assert "decode:  17%|" in drawn and "1/6 [00:00<?" in drawn


def test_bars_are_silent_off_a_terminal_or_when_off(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    progress.enable_progress_bars()
    try:
        assert type(progress.bar(3, "x")).__name__ == "_SilentBar"  # a pipe or a file: no bar
    finally:
        progress.disable_progress_bars()
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert type(progress.bar(3, "x")).__name__ == "_SilentBar"  # the library's default: off
    assert type(progress.bar(3, "x", enabled=True)).__name__ == "tqdm"


def test_bars_move_per_chunk_and_per_token_on_the_cpu(monkeypatch, tiny_llama):
    moves: dict[str, list[int]] = {}

    class Recorder:
        def __init__(self, total, desc, unit="it", initial=0, **kwargs):
            self.desc = desc
            moves[desc] = [initial]

        def update(self, n=1):
            moves[self.desc].append(n)

        def close(self):
            moves[self.desc].append("closed")

    monkeypatch.setattr(progress, "bar", Recorder)
    engine = okv.initialize(tiny_llama, omni(budget=16, prefill={"chunk_size": 16}, generation={"check_every": 4}))
    ids, mask = make_prompt(1)
    engine.generate(ids, attention_mask=mask, max_new_tokens=7)
    assert moves["prefill"] == [0, 16, 16, PROMPT_LEN - 32, "closed"]
    assert moves["decode"] == [1, 1, 1, 1, 1, 1, 1, "closed"]  # the first token comes from the prefill


def test_quiet_turns_our_bars_and_the_libraries_bars_off_until_the_command_ends(monkeypatch):
    names = (cli.HF_BARS_ENV, cli.TQDM_OFF_ENV)
    for name in names:
        monkeypatch.delenv(name, raising=False)
    parser = cli.build_parser()
    for argv, bars in ((["generate", "--quiet"], False), (["generate"], True), (["plan", "--context", "9"], False)):
        restore = cli._set_progress(parser.parse_args(argv))
        assert progress.progress_bars_enabled() is bars, argv
        assert [os.environ.get(name) for name in names] == ["1", "1"]  # pytest's stderr is no terminal
        restore()
        assert not progress.progress_bars_enabled() and not set(names) & set(os.environ)
    restore = cli._set_progress(parser.parse_args(["run", "script.py"]))  # the script's own bars stay
    assert not set(names) & set(os.environ)
    restore()
    restore = cli._set_progress(parser.parse_args(["run", "--quiet", "script.py"]))
    assert [os.environ.get(name) for name in names] == ["1", "1"]
    restore()
    monkeypatch.setenv(cli.TQDM_OFF_ENV, "0")  # a user's own setting is kept, and left as it was
    cli._set_progress(parser.parse_args(["generate", "--quiet"]))()
    assert os.environ[cli.TQDM_OFF_ENV] == "0"


def test_cpu_thread_default_leaves_a_core_free(monkeypatch):
    assert cpu_threads.default_cpu_threads(torch_threads=2, cores=2) == 1
    assert cpu_threads.default_cpu_threads(torch_threads=16, cores=16) == 15
    assert cpu_threads.default_cpu_threads(torch_threads=4, cores=32) == 4  # never more than torch's own
    assert cpu_threads.default_cpu_threads(torch_threads=1, cores=1) == 1
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", str(before))
        assert cpu_threads.apply_cpu_threads(None, "cpu") is None  # the environment wins
        assert cpu_threads.apply_cpu_threads(1, "cpu") == 1 and torch.get_num_threads() == 1  # so does the config
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(cpu_threads, "usable_cores", lambda: 2)
        torch.set_num_threads(2)
        assert cpu_threads.apply_cpu_threads(None, "cpu") == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert cpu_threads.apply_cpu_threads(None, "cuda") is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _report(engine, ids, mask, new_tokens=4):
    engine.generate(ids, attention_mask=mask, max_new_tokens=new_tokens)
    run = summarize_run(engine, ids.shape[1], " answer ")
    return run, "\n".join(run_lines(run["runs"], run))


def test_cpu_report_names_the_device_not_a_gpu(tiny_llama):
    ids, mask = make_prompt(1)
    run, text = _report(okv.initialize(tiny_llama, omni(budget=8)), ids, mask)
    assert run["runs"] == "omnikv" and run["compute_device"] == "cpu" and not run["whole_context_selected"]
    assert "GPU" not in text and "KV on cpu" in text and "host tier (cpu)" in text
    assert set(run["bytes"]) >= {"dense", "selected", "tail", "host", "bytes_fetched"}
    assert not any(key.startswith("gpu_") for key in run["bytes"])
    assert tier_label("gpu_dense", "cpu", "cpu") == "dense layers (cpu)"
    assert tier_label("host", "cuda:0", "cpu") == "host tier, used (cpu)"


def test_a_dense_config_is_reported_as_dense(tiny_llama):
    ids, mask = make_prompt(1)
    run, text = _report(okv.initialize(tiny_llama, "dense"), ids, mask)
    assert run["runs"] == "dense" and run["dense_because"] == "omnikv.enabled = false"
    assert text.startswith("[dense] layers DDDDDDDD") and "[omnikv]" not in text
    assert "fetched" not in text and "host tier" not in text


def test_a_prompt_inside_the_budget_says_attention_was_dense_but_the_tiers_were_not(tiny_llama):
    ids, mask = make_prompt(1)  # 40 tokens, budget 64
    run, text = _report(okv.initialize(tiny_llama, omni(budget=64)), ids, mask, new_tokens=5)
    assert run["whole_context_selected"] and set(run["selected_tokens_per_step"].values()) == {PROMPT_LEN}
    assert "(the whole context)" in text and "within the token budget" in text
    steps = run["decode_steps"]
    assert steps == 4 and f"in {steps} decode steps" in text
    assert run["bytes"]["bytes_fetched"] > run["bytes"]["host"]  # every step fetches the whole prompt again
    assert "a step)" in text


def test_plan_past_the_position_limit_does_not_fit(capsys):
    argv = ["plan", "--model-config", "smollm2-135m", "--context", "131072", "--gpu-memory", "80GB"]
    assert cli.main([*argv, "--host-memory", "512GB"]) == 1  # exit status 1: the run does not fit
    text = capsys.readouterr().out
    assert "DOES NOT FIT THE MODEL: 131,072 prompt + 32 new tokens" in text and "position limit of 8,192" in text
    fits_row = next(line for line in text.splitlines() if line.startswith("fits"))
    assert "True" not in fits_row
    assert cli.main([*argv, "--host-memory", "512GB", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["fits_model"] == {
        "max_positions": 8192,
        "max_positions_source": "max_position_embeddings",
        "tokens": 131104,
        "fits": False,
    }
    for name in ("dense", "omnikv"):
        assert report[name]["fits"]["positions"] is False and report[name]["fits"]["all"] is False
        longest = report[name]["longest_context"]
        assert longest["context"] == 8192 - 32 and longest["limited_by"] == "the model's position limit"
        assert longest["memory_allows"] > 8192
    assert cli.main(["plan", "--model-config", "smollm2-135m", "--context", "4096", "--json"]) == 0
    inside = json.loads(capsys.readouterr().out)
    assert inside["fits_model"]["fits"] and inside["omnikv"]["fits"]["positions"]


def test_the_profiler_keeps_kineto_quiet_unless_told(monkeypatch, tmp_path, tiny_llama):
    from omnikv_runtime.profiling import KINETO_LOG_LEVEL_ENV, QUIET_KINETO_LOG_LEVEL, MemoryProfiler

    monkeypatch.delenv(KINETO_LOG_LEVEL_ENV, raising=False)
    profiler = MemoryProfiler(tmp_path).start()
    profiler.stop()
    assert os.environ[KINETO_LOG_LEVEL_ENV] == QUIET_KINETO_LOG_LEVEL
    monkeypatch.setenv(KINETO_LOG_LEVEL_ENV, "1")  # a level the user set is kept
    profiler = MemoryProfiler(tmp_path).start()
    profiler.stop()
    assert os.environ[KINETO_LOG_LEVEL_ENV] == "1"


def test_heatmap_legend_and_eval_chart_axis(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from omnikv_runtime.eval.layer_analysis import save_heatmaps
    from omnikv_runtime.eval.report import bar_chart

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    save_heatmaps({"iou": torch.rand(4, 4), "mass": torch.rand(4, 4)}, str(tmp_path / "h.png"), marked=[1, 2])
    legend = figures[0].axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["red rows: suggested filter layers"]
    run = {"label": "a", "benchmark": "synthetic", "tasks": {"passkey": {"score": 50.0}}}
    bar_chart([run], tmp_path / "c.png")
    assert figures[-1].axes[0].get_ylabel().startswith("score (0-100")


def test_a_cache_from_new_cache_goes_in_by_either_keyword(tiny_llama):
    """transformers 5.24 takes ``cache=`` (``past_key_values=`` still works, with a FutureWarning); the
    README's quick start shows the first and mentions the second."""
    import inspect
    import warnings

    engine = okv.initialize(tiny_llama, omni(budget=16))
    ids, mask = make_prompt(1)
    keywords = ["past_key_values"] + (["cache"] if "cache" in inspect.signature(tiny_llama.forward).parameters else [])
    outputs = []
    for keyword in keywords:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            new = {keyword: engine.new_cache()}
            outputs.append(tiny_llama.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, **new))
        assert engine.stats()["decode_steps"] == 3  # the runtime's cache served the call
    assert all(torch.equal(out, outputs[0]) for out in outputs)


def test_profile_timeline_names_tiers_by_role_and_the_cpu(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from omnikv_runtime.profiling.plot import plot_report

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    sample = {"host_rss": 1, "pinned": 0, "tiers": {"gpu_dense": 5, "host": 3}, "transfer": {"bytes_fetched": 0}}
    report = {"samples": [{"t": 0.0, **sample}, {"t": 1.0, **sample}], "marks": [], "meta": {"device": "cpu"}}
    assert plot_report(report, tmp_path / "t.png")
    tiers, bandwidth = figures[0].axes[1], figures[0].axes[2]
    assert [t.get_text() for t in tiers.get_legend().get_texts()] == ["dense layers", "host tier, used"]
    assert "CPU" in tiers.get_title() and "GPU" not in tiers.get_title() + bandwidth.get_title()

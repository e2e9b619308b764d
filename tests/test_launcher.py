"""``omnikv run``: unmodified scripts keep their training numbers bit for bit, and generate goes through OmniKV."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from okv_testlib import make_model, omni
from safetensors.torch import load_file

from omnikv_runtime.launcher import STATS_ENV, Launcher

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_llama")
    make_model("llama").save_pretrained(folder)
    return folder


def _plain_run(script: Path, argv: list[str]) -> None:
    """The script as ``python script argv...`` runs it, in this process, without the launcher."""
    saved = sys.argv
    sys.argv = [str(script), *argv]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        assert exc.code in (None, 0)
    finally:
        sys.argv = saved


def test_training_is_bit_identical_under_the_launcher(model_dir, tmp_path):
    script = SCRIPTS / "train.py"
    _plain_run(script, [str(model_dir), str(tmp_path / "plain.safetensors")])
    launcher = Launcher(omni(8), stats_path=tmp_path / "stats.json")
    assert launcher.run(script, [str(model_dir), str(tmp_path / "wrapped.safetensors")]) == 0
    plain, wrapped = load_file(tmp_path / "plain.safetensors"), load_file(tmp_path / "wrapped.safetensors")
    assert plain.keys() == wrapped.keys() and len(plain) > 10
    assert plain["losses"].shape == (3,) and not torch.equal(plain["losses"][0], plain["losses"][-1])
    for name, tensor in plain.items():
        assert torch.equal(tensor, wrapped[name]), name
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert [m["class"] for m in stats["models"]] == ["LlamaForCausalLM"]  # it was wrapped
    assert launcher.wrapped[0].model.config._attn_implementation == "omnikv"


def test_generate_goes_through_omnikv(model_dir, tmp_path, monkeypatch):
    script = SCRIPTS / "infer.py"
    _plain_run(script, [str(model_dir), str(tmp_path / "plain.json")])
    monkeypatch.setenv(STATS_ENV, str(tmp_path / "stats.json"))
    launcher = Launcher(omni(1.0))  # a 100% budget reproduces dense exactly
    assert launcher.run(script, [str(model_dir), str(tmp_path / "wrapped.json"), "--exit-code", "0"]) == 0
    plain, wrapped = (
        json.loads((tmp_path / "plain.json").read_text()),
        json.loads((tmp_path / "wrapped.json").read_text()),
    )
    assert wrapped["ids"] == plain["ids"] and wrapped["logits_sum"] == plain["logits_sum"]
    assert wrapped["__name__"] == "__main__" and wrapped["argv"][1:] == [
        str(model_dir),
        str(tmp_path / "wrapped.json"),
        "--exit-code",
        "0",
    ]
    (model,) = json.loads((tmp_path / "stats.json").read_text())["models"]
    (call,) = model["generate_calls"]
    assert model["plan"] == "DFWsFWss" and call["decode_steps"] == 7 and call["new_tokens"] == 8
    assert call["selected_per_step"] == {"1": [40] * 7, "4": [40] * 7}  # filter layers selected every step
    assert call["transfer"]["bytes_fetched"] > 0 and call["transfer"]["gathers"] == 14


def test_budget_changes_what_generate_sees(model_dir, tmp_path):
    launcher = Launcher(omni(4))
    assert launcher.run(SCRIPTS / "infer.py", [str(model_dir), str(tmp_path / "out.json")]) == 0
    (call,) = launcher.report()["models"][0]["generate_calls"]
    assert call["selected_per_step"]["4"] == [4] * 7


def test_exit_codes_and_exceptions_pass_through(model_dir, tmp_path, capsys):
    args = [str(model_dir), str(tmp_path / "out.json"), "--new-tokens", "2"]
    assert Launcher(omni(8)).run(SCRIPTS / "infer.py", [*args, "--exit-code", "3"]) == 3
    assert "generated 2 tokens" in capsys.readouterr().out
    assert Launcher(omni(8)).run(SCRIPTS / "infer.py", [*args, "--fail"]) == 1
    err = capsys.readouterr().err
    assert "ValueError: boom from the script" in err and "infer.py" in err and "runpy" not in err
    assert Launcher().run(tmp_path / "missing.py", []) == 2


def test_unsupported_model_is_left_alone(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    launcher = Launcher()
    with caplog.at_level("WARNING"):
        assert launcher.attach(model) is None
    assert "not supported" in caplog.text and launcher.skipped[0]["model_type"] == "gpt2"
    assert "generate" not in vars(model)


def test_cli_run_subprocess(model_dir, tmp_path):
    env = {**os.environ, STATS_ENV: str(tmp_path / "stats.json")}
    (tmp_path / "config.json").write_text(json.dumps(omni(8)))
    command = [sys.executable, "-m", "omnikv_runtime.cli", "run", "--config", str(tmp_path / "config.json")]
    command.append(str(SCRIPTS / "infer.py"))
    result = subprocess.run(
        [*command, str(model_dir), str(tmp_path / "out.json"), "--new-tokens", "3", "--exit-code", "5"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 5, result.stderr
    assert result.stdout.strip() == "generated 3 tokens"
    assert json.loads((tmp_path / "stats.json").read_text())["models"][0]["generate_calls"][0]["new_tokens"] == 3

"""The command line reports a bad prompt or option before any model loads; ``omnikv run`` never breaks
the script it wraps (a model the config does not fit runs as it is, the script's logging and exit code
are its own, no deprecation warnings from arguments the launcher adds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from okv_testlib import make_model, omni

from omnikv_runtime import cli
from omnikv_runtime.errors import ModelLoadError
from omnikv_runtime.launcher import Launcher, StrictRunError

SCRIPTS = Path(__file__).parent / "scripts"


@pytest.fixture
def no_model_load(monkeypatch):
    """load_model stops the command with a marker error; the list records that it was reached."""
    reached: list[str] = []

    def load_model(*args, **kwargs):
        reached.append(args[0] if args else kwargs.get("name_or_path"))
        raise ModelLoadError("marker: the model would load now")

    monkeypatch.setattr("omnikv_runtime.models.load_model", load_model)
    return reached


def _stdin_from(monkeypatch, data: bytes) -> None:
    """Make sys.stdin a real pipe holding ``data`` (closed for writing)."""
    read, write = os.pipe()
    os.write(write, data)
    os.close(write)
    monkeypatch.setattr("sys.stdin", open(read, encoding="utf-8"))  # noqa: SIM115 - closed with the test


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "cannot read it (No such file or directory)"),
        (b"hello \xff\xfe world", "is not UTF-8 text (byte 0xff at offset 6): save it as UTF-8"),
        (b"", "is empty"),
        (b" \n\t\n", "is empty"),
    ],
)
def test_a_bad_prompt_file_is_reported_before_the_model_loads(tmp_path, capsys, no_model_load, content, message):
    prompt = tmp_path / "prompt.txt"
    if content is not None:
        prompt.write_bytes(content)
    assert cli.main(["generate", "--prompt-file", str(prompt)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"omnikv: error: --prompt-file {prompt}") and message in err, err
    assert "Traceback" not in err and no_model_load == []


@pytest.mark.parametrize(
    "data, args, message",
    [
        (b"", [], "stdin is empty"),
        (b"  \n", [], "stdin is empty"),
        (b"", ["--prompt-file", "-"], "stdin is empty"),
        (b"\xc3\x28 bad", [], "stdin is not UTF-8 text (byte 0xc3 at offset 0)"),
    ],
)
def test_empty_or_bad_piped_stdin_is_an_error_not_the_demo(monkeypatch, capsys, no_model_load, data, args, message):
    _stdin_from(monkeypatch, data)
    assert cli.main(["generate", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and no_model_load == [], err


def test_without_piped_input_the_demo_runs(monkeypatch, capsys, no_model_load):
    with open(os.devnull, encoding="utf-8") as devnull:  # not a pipe: nothing was meant to be read
        monkeypatch.setattr("sys.stdin", devnull)
        assert cli.main(["generate"]) == 2
    assert "marker: the model would load now" in capsys.readouterr().err and len(no_model_load) == 1


def test_piped_prompt_reaches_the_model_load(monkeypatch, capsys, no_model_load):
    _stdin_from(monkeypatch, "Où est la tour Eiffel ?".encode())
    assert cli.main(["generate"]) == 2
    assert "marker" in capsys.readouterr().err and len(no_model_load) == 1


@pytest.mark.parametrize("value, message", [("-1", "must be at least 1, got -1"), ("0", "got 0"), ("x", "'x'")])
def test_max_new_tokens_must_be_positive(capsys, no_model_load, value, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--max-new-tokens", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens" in err and message in err and "Traceback" not in err and no_model_load == []


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> tuple[Path, Path]:
    big, small = tmp_path_factory.mktemp("llama8"), tmp_path_factory.mktemp("llama4")
    make_model("llama").save_pretrained(big)
    make_model("llama", num_hidden_layers=4).save_pretrained(small)
    return big, small


def test_omnikv_run_leaves_the_script_alone(model_dirs, tmp_path):
    """Filter layer 4 does not exist in the 4-layer model: it runs without OmniKV, with one warning."""
    big, small = model_dirs
    config = tmp_path / "config.json"
    config.write_text(json.dumps(omni(8, prefill={"chunk_size": 16})), encoding="utf-8")
    stats = tmp_path / "stats.json"
    command = [sys.executable, "-W", "default", "-m", "omnikv_runtime.cli", "run", "--config", str(config)]
    command += ["--stats-json", str(stats), str(SCRIPTS / "two_models.py"), str(big), str(small), "--exit-code", "7"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 7, result.stderr
    err = result.stderr
    assert "SCRIPT|two_models|logging configured by the script" in err  # the script's basicConfig took effect
    assert "SCRIPT|two_models|shapes (1, 33) (1, 33) (1, 33)" in err
    warnings = [line for line in err.splitlines() if "runs without OmniKV" in line]
    assert len(warnings) == 1 and "omnikv.filter_layers" in warnings[0] and "the model has 4" in warnings[0]
    assert "deprecated" not in err.lower() and "Traceback" not in err, err
    report = json.loads(stats.read_text(encoding="utf-8"))
    assert [m["class"] for m in report["models"]] == ["LlamaForCausalLM"]
    assert len(report["models"][0]["generate_calls"]) == 2  # beam search (transformers' loop) and greedy
    assert report["unsupported"][0]["model_type"] == "llama" and "filter_layers" in report["unsupported"][0]["reason"]


def test_omnikv_run_strict_stops_on_a_model_it_cannot_take(model_dirs, tmp_path, capsys):
    big, small = model_dirs
    launcher = Launcher(omni(8), strict=True)
    code = launcher.run(SCRIPTS / "two_models.py", [str(big), str(small), "--exit-code", "7"])
    err = capsys.readouterr().err
    assert (
        code == 2 and "omnikv run: error: LlamaForCausalLM cannot run with OmniKV" in err and "the model has 4" in err
    )
    with pytest.raises(StrictRunError, match="model type 'gpt2' is not supported"):
        from transformers import GPT2Config, GPT2LMHeadModel

        launcher.attach(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))


def test_a_bad_length_in_a_wrapped_generate_fails_as_it_would_without_the_launcher():
    model = make_model("llama")
    plain = make_model("llama")
    Launcher(omni(8)).attach(model)
    ids = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    for model_under_test in (plain, model):
        with pytest.raises(ValueError, match="max_new_tokens") as plain_error:
            model_under_test.generate(ids, max_new_tokens=0, pad_token_id=0)
        assert "greater than 0" in str(plain_error.value)

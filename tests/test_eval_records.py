"""The evaluation harness loses nothing: a record torn by a kill is redone on resume, a raw record or a
data line it cannot use is named (file, line, field), an empty task fails, bad counts and a damaged
run.json are clear errors. Predictions are faked (the answer itself), so no model generates here."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from okv_testlib import make_model, omni

from omnikv_runtime import cli
from omnikv_runtime.eval.predict import Predictor
from omnikv_runtime.eval.records import read_raw, repair_tail
from omnikv_runtime.eval.runner import EvalError, EvalOptions, run_eval

FIXTURES = Path(__file__).parent / "fixtures" / "longbench"
CONFIG = omni(1.0)


@pytest.fixture
def fake_predictions(monkeypatch) -> list[str]:
    """Predictor.predict answers each sample with its first reference answer; returns the ids predicted."""
    predicted: list[str] = []

    def predict(self, spec, sample):
        predicted.append(sample.id)
        return {"pred": sample.answers[0], "prompt_tokens": 1, "truncated": False}

    monkeypatch.setattr(Predictor, "predict", predict)
    return predicted


@pytest.fixture(scope="module")
def model():
    return make_model("llama")


def _options(out: Path, tasks: list[str], data: Path = FIXTURES, **extra) -> EvalOptions:
    return EvalOptions("longbench", tasks, str(data), out=str(out), **extra)


def _data(tmp_path: Path, *tasks: str) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for task in tasks:
        shutil.copy(FIXTURES / f"{task}.jsonl", data)
    return data


def test_a_torn_last_record_is_redone_on_resume(tmp_path, model, fake_predictions):
    whole = run_eval(CONFIG, _options(tmp_path / "whole", ["hotpotqa"]), model, None)
    out = tmp_path / "resumed"
    run_eval(CONFIG, _options(out, ["hotpotqa"]), model, None)
    raw = out / "raw" / "hotpotqa.rank0.jsonl"
    lines = raw.read_text(encoding="utf-8").splitlines(keepends=True)
    assert len(lines) == 2
    raw.write_text(lines[0] + lines[1][: len(lines[1]) // 2], encoding="utf-8")  # killed while writing line 2
    fake_predictions.clear()
    resumed = run_eval(CONFIG, _options(out, ["hotpotqa"]), model, None)
    assert fake_predictions == ["hq-002"]  # only the torn sample is predicted again
    assert resumed == whole and resumed["failed"] == {}
    records = [json.loads(line) for line in raw.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in records] == ["hq-001", "hq-002"]  # every line whole: nothing appended to the torn one
    assert (out / "hotpotqa.jsonl").read_bytes() == (tmp_path / "whole" / "hotpotqa.jsonl").read_bytes()


def test_repair_tail_cuts_only_a_torn_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b'{"id": "a"}\n{"id": "b"}\n')
    assert not repair_tail(path) and path.read_bytes() == b'{"id": "a"}\n{"id": "b"}\n'
    path.write_bytes(b'{"id": "a"}\n{"id": "b", "sco')
    assert repair_tail(path) and path.read_bytes() == b'{"id": "a"}\n'
    path.write_bytes(b'{"id": "only half')
    assert repair_tail(path) and path.read_bytes() == b""
    assert not repair_tail(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"pred": "x", "score": 1.0}, "'id' missing"),
        ({"id": 7, "pred": "x", "score": 1.0}, "'id' expected a string, got 7"),
        ({"id": "hq-002", "pred": "x", "score": "high"}, "'score' expected a number, got 'high'"),
        ({"id": "hq-002", "pred": "x", "score": 1.0, "length": "3000"}, "'length' expected a whole number"),
        (["hq-002"], "'<record>' expected a JSON object, got list"),
    ],
)
def test_an_unusable_raw_record_is_named_and_its_sample_redone(tmp_path, model, fake_predictions, caplog, bad, field):
    out = tmp_path / "run"
    run_eval(CONFIG, _options(out, ["hotpotqa"]), model, None)
    raw = out / "raw" / "hotpotqa.rank0.jsonl"
    first = raw.read_text(encoding="utf-8").splitlines()[0]
    raw.write_text(first + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    fake_predictions.clear()
    with caplog.at_level(logging.WARNING, logger="omnikv_runtime.eval.records"):
        results = run_eval(CONFIG, _options(out, ["hotpotqa"]), model, None)
    assert f"{raw}, line 2: field {field}" in caplog.text
    assert fake_predictions == ["hq-002"] and results["failed"] == {} and results["tasks"]["hotpotqa"]["samples"] == 2


def test_bad_data_fields_and_empty_tasks_are_named_failures(tmp_path, model, fake_predictions):
    data = _data(tmp_path, "hotpotqa", "qasper_e", "trec")
    lines = (data / "qasper_e.jsonl").read_text(encoding="utf-8").splitlines()
    wrong_length = json.loads(lines[1])
    wrong_length["length"] = "5000"
    (data / "qasper_e.jsonl").write_text(lines[0] + "\n" + json.dumps(wrong_length) + "\n", encoding="utf-8")
    trec = json.loads((data / "trec.jsonl").read_text(encoding="utf-8"))
    trec["all_classes"] = ["Abbreviation", 3]
    (data / "trec.jsonl").write_text(json.dumps(trec) + "\n", encoding="utf-8")
    (data / "musique.jsonl").write_text("\n  \n", encoding="utf-8")
    (data / "2wikimqa.jsonl").write_bytes(b'{"input": "caf\xe9"}\n')
    tasks = ["hotpotqa", "qasper_e", "trec", "musique", "2wikimqa"]
    results = run_eval(CONFIG, _options(tmp_path / "run", tasks, data), model, None)
    assert list(results["tasks"]) == ["hotpotqa"] and results["tasks"]["hotpotqa"]["score"] == 100.0
    failed = results["failed"]
    assert f"{data / 'qasper_e.jsonl'}, line 2: field 'length' = '5000' is not allowed" in failed["qasper_e"]
    assert f"{data / 'trec.jsonl'}, line 1: field 'all_classes' = ['Abbreviation', 3]" in failed["trec"]
    assert "class names (strings)" in failed["trec"]
    assert f"{data / 'musique.jsonl'}: no samples (the file is empty" in failed["musique"]
    assert f"{data / '2wikimqa.jsonl'}, line 1: not UTF-8 text" in failed["2wikimqa"]
    assert json.loads((tmp_path / "run" / "results.json").read_text(encoding="utf-8")) == results


def test_longbench_e_lengths_fill_the_buckets(tmp_path, model, fake_predictions):
    results = run_eval(CONFIG, _options(tmp_path / "run", ["qasper_e"]), model, None)
    assert results["tasks"]["qasper_e"]["buckets"] == {"0-4k": 100.0, "4-8k": 100.0, "8k+": None}


@pytest.mark.parametrize(
    "flag, value", [("--limit", "-1"), ("--limit", "0"), ("--samples", "0"), ("--max-new-tokens", "-2")]
)
def test_counts_below_one_are_refused(tmp_path, capsys, flag, value):
    args = ["eval", "--benchmark", "synthetic", "--out", str(tmp_path / "run"), flag, value]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"omnikv: error: {flag} must be a whole number of at least 1, got {value}" in err
    assert not (tmp_path / "run").exists()


def test_a_damaged_run_json_is_a_clear_error(tmp_path, model, fake_predictions, capsys):
    out = tmp_path / "run"
    run_eval(CONFIG, _options(out, ["hotpotqa"]), model, None)
    (out / "run.json").write_text('{"config": {"omnikv": ', encoding="utf-8")  # cut short
    with pytest.raises(EvalError, match=r"run.json is damaged .*delete run.json to resume"):
        run_eval(CONFIG, _options(out, ["hotpotqa"]), model, None)
    (out / "run.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(EvalError, match="expected a JSON object, got list"):
        run_eval(CONFIG, _options(out, ["hotpotqa"]), model, None)
    (out / "run.json").unlink()  # what the message says to do: the run resumes
    fake_predictions.clear()
    assert run_eval(CONFIG, _options(out, ["hotpotqa"]), model, None)["tasks"]["hotpotqa"]["samples"] == 2
    assert fake_predictions == [] and len(read_raw(out, "hotpotqa")) == 2
    (out / "run.json").write_bytes(b"\xff\xfe")
    code = cli.main(["eval", "--benchmark", "longbench", "--tasks", "hotpotqa", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "run.json is damaged" in err and "Traceback" not in err

"""The evaluation harness end to end on the bundled model: official-format fixtures, resume, bad data,
W=2 worker processes, the CLI and the report. Generation is capped at a few tokens to keep it quick."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from omnikv_runtime import cli, progress
from omnikv_runtime.config import load_config
from omnikv_runtime.eval import infinitebench, longbench, metrics
from omnikv_runtime.eval.predict import Predictor
from omnikv_runtime.eval.runner import EvalError, EvalOptions, plan_shards, run_eval, run_shard, task_specs

FIXTURES = Path(__file__).parent / "fixtures"
LONGBENCH_FIXTURES = sorted(p.stem for p in (FIXTURES / "longbench").glob("*.jsonl"))
DENSE = {"omnikv": {"enabled": False}, "offload": {"device": "none"}}
# OmniKV at a budget far below these prompts' lengths: filter layers 2, 6, 18 as configs/default.json
SPARSE = {"omnikv": {"filter_layers": [2, 6, 18], "token_budget": 16, "min_token_budget": 1}}


def _records(run_dir: Path, task: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()]


def test_longbench_and_infinitebench_fixtures_end_to_end(bundled, tmp_path):
    model, tokenizer = bundled
    lb_out = tmp_path / "lb"
    options = EvalOptions(
        "longbench", LONGBENCH_FIXTURES, str(FIXTURES / "longbench"), out=str(lb_out), max_new_tokens=2
    )
    results = run_eval(SPARSE, options, model, tokenizer)
    assert results["failed"] == {} and set(results["tasks"]) == set(LONGBENCH_FIXTURES)
    for task in LONGBENCH_FIXTURES:
        spec = longbench.task_spec(task)
        records = _records(lb_out, task)
        lines = (FIXTURES / "longbench" / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
        assert [r["id"] for r in records] == [json.loads(line)["_id"] for line in lines]
        for record, line in zip(records, lines):
            raw = json.loads(line)
            classes = raw["all_classes"] or []
            pred = record["pred"]
            if task in longbench.FIRST_LINE_ONLY:
                pred = pred.lstrip("\n").split("\n")[0]
            metric = metrics.METRICS[spec.metric]
            assert record["score"] == max(metric(pred, a, all_classes=classes) for a in raw["answers"])
            # the prompt is the official template, inside the chat template unless the task keeps it out
            text = spec.prompt(longbench.Sample(task, "", {"context": raw["context"], "input": raw["input"]}, []))
            if spec.chat:
                text = tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
                )
            expected = tokenizer(text, add_special_tokens=not spec.chat)["input_ids"]
            assert record["prompt_tokens"] == len(expected)
        summary = results["tasks"][task]
        assert summary["score"] == round(100 * sum(r["score"] for r in records) / len(records), 2)
    assert set(results["tasks"]["qasper_e"]["buckets"]) == {"0-4k", "4-8k", "8k+"}
    assert results["tasks"]["qasper_e"]["buckets"]["8k+"] is None  # fixture lengths 3000 and 5000

    ib_out = tmp_path / "ib"
    options = EvalOptions(
        "infinitebench",
        ["passkey", "longbook_choice_eng", "code_run"],
        str(FIXTURES / "infinitebench"),
        out=str(ib_out),
        max_new_tokens=6,
    )
    results = run_eval(SPARSE, options, model, tokenizer)
    assert results["failed"] == {}
    passkey = _records(ib_out, "passkey")[0]
    assert passkey["score"] == 1.0 and "52817" in passkey["pred"]  # a real retrieval through OmniKV
    choice = _records(ib_out, "longbook_choice_eng")[0]
    assert choice["answers"] == [["Bread and a lamp", "B"]]
    assert choice["score"] == infinitebench.score_longbook_choice(choice["pred"], ["Bread and a lamp", "B"])


def test_resumed_run_writes_the_same_results(bundled, tmp_path, monkeypatch):
    model, tokenizer = bundled
    tasks = ["hotpotqa", "trec"]

    def options(out: Path) -> EvalOptions:
        return EvalOptions("longbench", tasks, str(FIXTURES / "longbench"), out=str(out), max_new_tokens=2)

    run_eval(DENSE, options(tmp_path / "whole"), model, tokenizer)

    calls = []
    original = Predictor.predict

    def interrupted(self, spec, sample):
        if len(calls) == 1:  # stop in the middle of hotpotqa
            raise KeyboardInterrupt
        calls.append(sample.id)
        return original(self, spec, sample)

    monkeypatch.setattr(Predictor, "predict", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_eval(DENSE, options(tmp_path / "resumed"), model, tokenizer)
    monkeypatch.setattr(
        Predictor, "predict", lambda self, spec, sample: calls.append(sample.id) or original(self, spec, sample)
    )
    calls.clear()
    run_eval(DENSE, options(tmp_path / "resumed"), model, tokenizer)
    assert calls == ["hq-002", "trec-001"]  # hq-001, done before the interruption, is not redone
    for name in ["results.json", *(f"{t}.jsonl" for t in tasks)]:
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    with pytest.raises(EvalError, match="another config"):
        run_eval(SPARSE, options(tmp_path / "resumed"), model, tokenizer)


def test_bad_data_is_named_and_other_tasks_run(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(FIXTURES / "longbench" / "hotpotqa.jsonl", data)
    good = (FIXTURES / "longbench" / "hotpotqa.jsonl").read_text(encoding="utf-8").splitlines()[0]
    (data / "musique.jsonl").write_text("\n{not json\n" + good + "\n", encoding="utf-8")  # line 2 is bad
    no_answers = json.loads(good)
    del no_answers["answers"]
    (data / "2wikimqa.jsonl").write_text(json.dumps(no_answers) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    code = cli.main(
        [
            "eval",
            "--config",
            "dense",
            "--benchmark",
            "longbench",
            "--tasks",
            "hotpotqa,musique,2wikimqa,narrativeqa",
            "--data-dir",
            str(data),
            "--limit",
            "1",
            "--max-new-tokens",
            "2",
            "--out",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 1 and "hotpotqa" in printed and "FAILED" in printed
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert list(results["tasks"]) == ["hotpotqa"] and results["tasks"]["hotpotqa"]["samples"] == 1
    failed = results["failed"]
    assert f"{data / 'musique.jsonl'}, line 2: not valid JSON" in failed["musique"]
    assert f"{data / '2wikimqa.jsonl'}, line 1: missing field 'answers'" in failed["2wikimqa"]
    assert f"{data / 'narrativeqa.jsonl'}: file not found" in failed["narrativeqa"]

    report = tmp_path / "cmp"
    assert cli.main(["eval-report", str(out), str(out), "--out", str(report)]) == 0
    table = (tmp_path / "cmp.md").read_text(encoding="utf-8")
    assert "| hotpotqa | qa_f1 |" in table and "| musique |  | failed | failed |" in table
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert cli.main(["eval-report", str(tmp_path)]) == 2  # not a run directory: a named error, no traceback


def test_unknown_task_and_benchmark_are_named():
    with pytest.raises(EvalError, match="unknown longbench task 'hotpot'.*did you mean 'hotpotqa'"):
        run_eval(DENSE, EvalOptions("longbench", ["hotpot"]))
    with pytest.raises(EvalError, match="unknown benchmark 'ruler'"):
        run_eval(DENSE, EvalOptions("ruler"))


def _sharded_options(out: Path, world_size: int) -> EvalOptions:
    return EvalOptions(
        "synthetic",
        ["passkey"],
        out=str(out),
        world_size=world_size,
        lengths=[150],
        depths=[0.2, 0.8],
        max_new_tokens=2,
    )


def _assert_same_as_one_worker(one: dict, two: dict, tmp_path: Path) -> None:
    assert one == two and one["tasks"]["passkey"]["samples"] == 2
    raw = sorted(p.name for p in (tmp_path / "w2" / "raw").iterdir())
    assert raw == ["passkey.rank0.jsonl", "passkey.rank1.jsonl"]
    assert (tmp_path / "w1" / "passkey.jsonl").read_bytes() == (tmp_path / "w2" / "passkey.jsonl").read_bytes()


def test_shards_of_two_workers_merge_to_the_one_worker_results(bundled, tmp_path, monkeypatch):
    """The two ranks' shards (run here one after the other, in this process) merge into W=1's files."""
    model, tokenizer = bundled
    bars = []

    class Recorder:  # the samples bar of each task: its total, its line and how far it moved
        def __init__(self, total, desc, unit="it", position=None, **kwargs):
            self.row = {"desc": desc, "total": total, "unit": unit, "position": position, "done": 0}
            bars.append(self.row)

        def update(self, n=1):
            self.row["done"] += n

        def close(self):
            self.row["closed"] = True

    monkeypatch.setattr(progress, "bar", Recorder)
    one = run_eval(DENSE, _sharded_options(tmp_path / "w1", 1), model, tokenizer)
    samples_bars = [b for b in bars if b["unit"] == "sample"]
    assert samples_bars == [{"desc": "passkey", "total": 2, "unit": "sample", "position": 0, "done": 2, "closed": True}]
    options = _sharded_options(tmp_path / "w2", 2)
    _, _, assignments = plan_shards(task_specs(options), options)
    assert assignments[0]["passkey"] == ["passkey-150-0.2-0"] and assignments[1]["passkey"] == ["passkey-150-0.8-0"]
    for rank in (0, 1):
        run_shard(rank, 2, load_config(DENSE).to_dict(), options, assignments[rank], model, tokenizer)
    two = run_eval(DENSE, options)  # every sample is done: this only collects
    _assert_same_as_one_worker(one, two, tmp_path)


@pytest.mark.slow
def test_two_worker_processes_match_one(bundled, tmp_path):
    """W=2 spawned CPU workers (each imports torch and loads the model: ~1 min on a busy 2-core box)."""
    model, tokenizer = bundled
    one = run_eval(DENSE, _sharded_options(tmp_path / "w1", 1), model, tokenizer)
    two = run_eval(DENSE, _sharded_options(tmp_path / "w2", 2))
    _assert_same_as_one_worker(one, two, tmp_path)


def test_middle_truncation_keeps_both_ends_and_fits(bundled):
    _, tokenizer = bundled
    head, tail = "Instructions at the start. ", " Question at the end?"
    prompt = head + " ".join(f"filler{i}" for i in range(300)) + tail
    for chat in (False, True):
        predictor = Predictor(None, tokenizer, limit=120, use_chat_template=chat, cot=False)
        cut, ids, truncated = predictor.fit(prompt, chat, reserve=20)
        assert truncated and cut.startswith(head) and cut.endswith(tail)
        assert 100 - 4 <= len(ids) <= 100  # limit - reserve, give or take the re-encoding at the cut
        assert "filler150" not in cut  # the middle went
    short = Predictor(None, tokenizer, limit=4096, use_chat_template=True, cot=False)
    assert short.fit(prompt, True, reserve=20)[2] is False


def test_chain_of_thought_asks_twice(bundled, tmp_path, monkeypatch):
    model, tokenizer = bundled
    prompts = []
    original = Predictor._generate

    def spy(self, ids, max_new, stop_at_newline):
        prompts.append(tokenizer.decode(ids))
        return original(self, ids, max_new, stop_at_newline)

    monkeypatch.setattr(Predictor, "_generate", spy)
    config = {**DENSE, "generation": {"cot": True}}
    options = EvalOptions(
        "longbench", ["hotpotqa"], str(FIXTURES / "longbench"), limit=1, out=str(tmp_path), max_new_tokens=3
    )
    run_eval(config, options, model, tokenizer)
    record = _records(tmp_path, "hotpotqa")[0]
    assert len(prompts) == 2 and prompts[0].endswith("Let's think step by step.")
    assert record["reasoning"] and record["reasoning"].strip() in prompts[1]
    assert "Now give only the final answer" in prompts[1]


def _hotpot_rows(tmp_path: Path, rows: list[dict]) -> Path:
    good = json.loads((FIXTURES / "longbench" / "hotpotqa.jsonl").read_text(encoding="utf-8").splitlines()[0])
    (tmp_path / "hotpotqa.jsonl").write_text("".join(json.dumps({**good, **row}) + "\n" for row in rows), "utf-8")
    return tmp_path


@pytest.mark.parametrize(
    "bad, field, allowed",
    [
        ({"input": 5}, "input", "a string"),
        ({"context": None}, "context", "a string"),
        ({"answers": [None, 5]}, "answers", "a non-empty list of reference answers (strings)"),
        ({"answers": "Mara Quill"}, "answers", "a non-empty list of reference answers (strings)"),
        ({"_id": ["x"]}, "_id", "a string or a whole number"),
    ],
)
def test_a_longbench_row_of_the_wrong_types_is_refused_naming_line_and_field(tmp_path, bad, field, allowed):
    data = _hotpot_rows(tmp_path, [{"_id": "a"}, {"_id": "b", **bad}])
    with pytest.raises(longbench.EvalDataError) as refused:
        longbench.task_spec("hotpotqa").load(data, None)
    assert str(refused.value).startswith(f"{data / 'hotpotqa.jsonl'}, line 2: field {field!r} = ")
    assert str(refused.value).endswith(f"is not allowed: {allowed}")


def test_a_duplicate_longbench_id_is_refused_naming_both_lines(tmp_path):
    data = _hotpot_rows(tmp_path, [{"_id": "a"}, {"_id": "b"}, {"_id": "a"}])
    with pytest.raises(longbench.EvalDataError, match=r"line 3: field '_id' = 'a' is not allowed: .*line 1"):
        longbench.task_spec("hotpotqa").load(data, None)
    assert [s.id for s in longbench.task_spec("hotpotqa").load(_hotpot_rows(tmp_path, [{"_id": 7}]), None)] == ["7"]


def test_synthetic_lengths_below_one_token_are_refused(capsys):
    from omnikv_runtime.eval import synthetic

    with pytest.raises(ValueError, match=r"lengths must be whole numbers of tokens of at least 1, got \[100, 0\]"):
        synthetic.task_spec("passkey", lengths=(100, 0))
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["eval", "--benchmark", "synthetic", "--lengths", "100,0"])
    assert "--lengths: expected whole numbers of at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["eval", "--benchmark", "synthetic", "--depths", "0.5,1.5"])
    assert "--depths: expected numbers from 0 to 1, got 1.5" in capsys.readouterr().err

"""The memory profiler: marks, tier bytes checked against the geometry, report, PNG and Perfetto trace."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

from okv_testlib import PAD, make_model, make_prompt, omni

import omnikv_runtime as okv
from omnikv_runtime.cli import main
from omnikv_runtime.launcher import Launcher
from omnikv_runtime.models.random import TINY_LLAMA
from omnikv_runtime.profiling.plot import plot_report

KV_HEADS = TINY_LLAMA["num_key_value_heads"]
HEAD_DIM = TINY_LLAMA["hidden_size"] // TINY_LLAMA["num_attention_heads"]
FLOAT32 = 4


def _tier_bytes(layers: int, tokens: int, batch: int) -> int:
    return layers * tokens * KV_HEADS * HEAD_DIM * 2 * FLOAT32 * batch


def test_profile_report_matches_geometry(tmp_path):
    engine = okv.initialize(make_model("llama"), omni(6))
    ids, mask = make_prompt(2)
    with okv.profile_memory(engine, out_dir=tmp_path, config={"interval_ms": 5}) as prof:
        engine.generate(ids, attention_mask=mask, max_new_tokens=5, pad_token_id=PAD)
    report = json.loads((tmp_path / "report.json").read_text())
    (entry,) = report["engines"]
    # plan DFWsFWss: 5 layers with full KV, 3 sparse; 40 prompt + 5 new tokens reserved (rounded up to 256),
    # 44 stored, batch 2; the tail ring has a slot per reserved new token (256 - 40)
    expected = {
        "gpu_dense": _tier_bytes(5, 256, 2),
        "gpu_selected": _tier_bytes(3, 6, 2),
        "gpu_tail": _tier_bytes(3, 256 - 40, 2),
        "host": _tier_bytes(3, 44, 2),
    }
    assert {tier: entry["tiers_final"][tier] for tier in expected} == expected
    assert all(check["match"] for check in entry["geometry_check"].values())
    assert {tier: check["expected"] for tier, check in entry["geometry_check"].items()} == expected
    assert {tier: report["samples"][-1]["tiers"][tier] for tier in expected} == expected
    kinds = [mark["kind"] for mark in report["marks"]]
    assert kinds.count("prefill") == 1 and kinds.count("decode") == 4 and kinds.count("fetch") == 8
    fetches = {(m["layer"], m["bytes"], m["tokens"]) for m in report["marks"] if m["kind"] == "fetch"}
    # filter layer 1 feeds sparse layer 3; filter layer 4 feeds 6 and 7: 6 rows of K and V per layer and row
    assert fetches == {(1, _tier_bytes(1, 6, 2), 6), (4, _tier_bytes(2, 6, 2), 6)}
    assert report["summary"]["bytes_fetched"] == engine.stats()["transfer"]["bytes_fetched"]
    assert report["summary"]["decode_steps"] == 4 and len(report["samples"]) >= 10
    assert prof.files["timeline_png"].endswith("timeline.png") and (tmp_path / "timeline.png").stat().st_size > 10_000
    with gzip.open(tmp_path / "trace.json.gz", "rt") as handle:
        trace = json.load(handle)
    names = {event.get("name") for event in trace["traceEvents"]}
    assert {"omnikv.prefill", "omnikv.decode", "omnikv.fetch.layer4", "KV tiers (bytes)"} <= names


def test_profile_plot_later_and_without_matplotlib(tmp_path, monkeypatch, caplog):
    engine = okv.initialize(make_model("qwen2"), omni(4, profiling={"trace": False}))
    ids, mask = make_prompt(1)
    with okv.profile_memory(engine, out_dir=tmp_path):
        engine.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=PAD)
    assert not (tmp_path / "trace.json.gz").exists()  # profiling.trace = false
    (tmp_path / "timeline.png").unlink()
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)
        assert plot_report(tmp_path / "report.json", tmp_path / "x.png") is False
    assert "matplotlib is not installed" in caplog.text
    assert main(["profile-plot", str(tmp_path / "report.json")]) == 0
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


def test_profile_cli_random_weights(tmp_path, capsys):
    model_config = tmp_path / "config.json"
    model_config.write_text(make_model("llama").config.to_json_string())
    config = tmp_path / "omni.json"
    config.write_text(json.dumps(omni(8, profiling={"trace": False})))
    args = ["profile", "--config", str(config), "--random-weights", "--model-config", str(model_config)]
    args += ["--device", "cpu", "--prompt-tokens", "48", "--max-new-tokens", "4", "--out", str(tmp_path / "p")]
    assert main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["summary"]["decode_steps"] == 3 and result["summary"]["fetches"] == 6
    assert result["geometry_check"]["host"]["expected"] == _tier_bytes(3, 51, 1)
    assert all(check["match"] for check in result["geometry_check"].values())
    assert Path(result["files"]["report"]).is_file()


def test_run_with_profile_memory(tmp_path):
    model_dir = tmp_path / "model"
    make_model("llama").save_pretrained(model_dir)
    script = Path(__file__).parent / "scripts" / "infer.py"
    launcher = Launcher(omni(8, profiling={"trace": False, "png": False}), profile_dir=tmp_path / "prof")
    assert launcher.run(script, [str(model_dir), str(tmp_path / "out.json"), "--new-tokens", "4"]) == 0
    report = json.loads((tmp_path / "prof" / "report.json").read_text())
    kinds = [mark["kind"] for mark in report["marks"]]
    assert kinds.count("forward") == 1 and kinds.count("decode") == 3 and kinds.count("fetch") == 6
    assert report["engines"][0]["geometry_check"]["host"]["match"]

"""benchmarks/capacity.py on CPU with a tiny model: filling the cache directly, decoding, planner agreement."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

BENCHMARK = Path(__file__).parent.parent / "benchmarks" / "capacity.py"


def _load():
    spec = importlib.util.spec_from_file_location("capacity_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_capacity_logic_on_cpu(capsys):
    threads = torch.get_num_threads()
    try:
        report = _load().main(
            ["--device", "cpu", "--tiny", "--contexts", "40", "--batches", "1,2", "--decode-steps", "3"]
            + ["--omnikv-context", "70", "--gpu-memory", "80GB", "--host-memory", "1GB"]
            + ["--host-dtypes", "auto,float8_e4m3fn"]
        )
    finally:
        torch.set_num_threads(threads)
    runs = report["runs"]
    modes = ["omnikv", "omnikv_float8_e4m3fn", "dense"]
    assert [(r["mode"], r["batch"]) for r in runs] == [(m, b) for b in (1, 2) for m in modes]
    assert all(r["tiers_exact"] and r["pinned_after_free"] == 0 for r in runs)
    omni, fp8 = runs[3], runs[4]
    # 3 sparse layers x 2 rows x (40 filled + 3 decoded) tokens x 2 KV heads x 16 x K,V x float32
    assert omni["tiers"]["host"] == 3 * 2 * 43 * 2 * 16 * 2 * 4
    # the FP8 tier: one byte per value and a float32 scale per 16 values
    assert fp8["tiers"]["host"] == 3 * 2 * 43 * 2 * (16 + 4) * 2 and fp8["host_dtype"] == "float8_e4m3fn"
    assert omni["tiers"]["gpu_selected"] == fp8["tiers"]["gpu_selected"] == 3 * 2 * 8 * 2 * 16 * 2 * 4  # budget 8
    assert runs[2]["tiers"]["host"] == 0 and runs[2]["tiers"]["gpu_dense"] == 8 * 256 * 2 * 16 * 2 * 4  # reserve 256
    longest_runs = report["longest_runs"]
    assert set(longest_runs) == {"omnikv", "omnikv_float8_e4m3fn"}
    assert all(r["context"] == 70 and r["tiers_exact"] for r in longest_runs.values())
    longest = report["longest_context"]
    assert longest["omnikv"]["this_machine"]["limited_by"] == "host"  # 1 GB of host memory
    assert longest["omnikv_float8_e4m3fn"]["this_machine"]["context"] > longest["omnikv"]["this_machine"]["context"]
    assert longest["omnikv"]["80GB_card_512GB_host"]["context"] > longest["dense"]["80GB_card_512GB_host"]["context"]
    assert "longest context omnikv_float8_e4m3fn" in capsys.readouterr().out

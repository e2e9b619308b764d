"""Rules across config fields live in the config, checked once at load: the options of a host tier
(an FP8 tier, the hot cache) need ``offload.device = "cpu"``; the host tier's storage names are declared once."""

from __future__ import annotations

import json

import pytest
import torch

import omnikv_runtime as okv
from omnikv_runtime.cli import main
from omnikv_runtime.config import HOST_DTYPES, OffloadSection
from omnikv_runtime.transfer.fp8 import FP8_DTYPE, storage_dtype


@pytest.mark.parametrize(
    ("offload", "field", "value"),
    [
        ({"device": "none", "host_dtype": "float8_e4m3fn"}, "offload.host_dtype", "float8_e4m3fn"),
        ({"device": "none", "hot_cache_tokens": 24}, "offload.hot_cache_tokens", 24),
        ({"hot_cache_tokens": 24, "device": "none", "eviction": "lfu"}, "offload.hot_cache_tokens", 24),
    ],
)
def test_host_tier_options_without_cpu_offload_are_refused_at_load(offload, field, value, tmp_path):
    with pytest.raises(okv.ConfigError) as error:
        okv.load_config({"offload": offload})
    assert (error.value.field, error.value.value) == (field, value)
    assert "offload.device = 'none'" in error.value.allowed and "offload.device = 'cpu'" in error.value.allowed
    assert f"config field '{field}' = {value!r} is not allowed" in str(error.value)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"offload": offload}), encoding="utf-8")
    with pytest.raises(okv.ConfigError) as from_file:
        okv.load_config(path)
    assert from_file.value.source == str(path) and from_file.value.field == field


def test_the_same_options_load_with_cpu_offload():
    config = okv.load_config({"offload": {"device": "cpu", "host_dtype": "float8_e4m3fn", "hot_cache_tokens": 24}})
    assert (config.offload.host_dtype, config.offload.hot_cache_tokens) == ("float8_e4m3fn", 24)
    on_gpu = okv.load_config({"offload": {"device": "none", "host_dtype": "auto", "hot_cache_tokens": 0}})
    assert on_gpu.offload.device == "none"


def test_a_field_of_the_wrong_kind_gets_its_own_error_first():
    with pytest.raises(okv.ConfigError) as error:
        okv.load_config({"offload": {"device": "none", "hot_cache_tokens": -3}})
    assert error.value.field == "offload.hot_cache_tokens" and "greater than or equal to 0" in error.value.allowed
    with pytest.raises(okv.ConfigError) as error:
        okv.load_config({"offload": {"device": "none", "host_dtype": "float8"}})
    assert error.value.field == "offload.host_dtype" and "'auto' or 'float8_e4m3fn'" in error.value.allowed


@pytest.mark.parametrize(
    ("start", "field", "value"),
    [
        ({"host_dtype": "float8_e4m3fn"}, "device", "none"),
        ({"device": "none"}, "host_dtype", "float8_e4m3fn"),
        ({"device": "none"}, "hot_cache_tokens", 8),
        ({"hot_cache_tokens": 8}, "device", "none"),
    ],
)
def test_a_refused_assignment_leaves_the_section_as_it_was(start, field, value):
    config = okv.load_config({"offload": start})
    before = config.offload.model_dump()
    with pytest.raises(ValueError, match="offload.device = 'none'"):
        setattr(config.offload, field, value)
    assert config.offload.model_dump() == before


def test_host_dtypes_are_declared_once():
    assert HOST_DTYPES == ("auto", "float8_e4m3fn")
    assert [storage_dtype(name) for name in HOST_DTYPES] == [None, FP8_DTYPE]
    assert FP8_DTYPE == torch.float8_e4m3fn
    # the config's field takes exactly these names
    for name in HOST_DTYPES:
        assert OffloadSection(host_dtype=name).host_dtype == name


def test_plan_cli_refuses_an_fp8_tier_on_the_gpu(tmp_path, capsys):
    path = tmp_path / "gpu_tier.json"
    path.write_text(json.dumps({"offload": {"device": "none"}}), encoding="utf-8")
    args = ["plan", "--config", str(path), "--model-config", "llama3-8b", "--context", "4096"]
    assert main([*args, "--host-dtype", "float8_e4m3fn"]) == 2
    assert "config field 'offload.host_dtype' = 'float8_e4m3fn' is not allowed" in capsys.readouterr().err
    assert main([*args, "--host-dtype", "auto", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["omnikv"]["host_dtype"] == "auto"

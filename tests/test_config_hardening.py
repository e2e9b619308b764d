"""Bad config input: every failure to load a file is a ConfigError naming it, sizes are bounded, and code
named in a config runs only with an explicit opt-in (policy arguments: test_policy_params.py)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
from okv_testlib import make_model, omni

import omnikv_runtime as okv
from omnikv_runtime import cli
from omnikv_runtime.config import OmniKVConfig
from omnikv_runtime.engine import Engine
from omnikv_runtime.profiling import profile_memory

DOCS = Path(__file__).resolve().parents[1] / "docs" / "policies.md"


def _file_error(tmp_path: Path, content: bytes) -> okv.ConfigError:
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config(path)
    assert str(path) in str(excinfo.value)
    return excinfo.value


# files that fail to load ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "allowed"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested less deeply"),
        (b'{"omnikv": {"selector": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}", "nested less deeply"),
        (b'{"model": {"name_or_path": "caf\xe9"}}', "UTF-8 text (byte 31"),
        ('{"omnikv": {}}'.encode("utf-16"), "UTF-8 text"),
        (b'{"omnikv": {"token_budget": 1' + b"0" * 5000 + b"}}", "4300-digit limit"),
        (b'{"omnikv": {"token_budget": NaN}}', "NaN is not a JSON value"),
        (b'{"profiling": {"interval_ms": Infinity}}', "Infinity is not a JSON value"),
        (b"", "valid JSON"),
        (b'{"omnikv": {"token_budget": 8,}}', "valid JSON"),
        (b"[1, 2]", "a JSON object"),
    ],
    ids=[
        "deep-list",
        "deep-in-section",
        "latin-1",
        "utf-16",
        "digit-limit",
        "nan",
        "infinity",
        "empty",
        "comma",
        "list",
    ],
)
def test_a_file_that_cannot_load_is_a_config_error_naming_it(tmp_path, content, allowed):
    error = _file_error(tmp_path, content)
    assert error.field == "<file>" and allowed in str(error)


def test_a_bad_field_in_a_file_names_the_file(tmp_path):
    error = _file_error(tmp_path, json.dumps({"omnikv": {"token_budget": 1.5}}).encode())
    assert error.field == "omnikv.token_budget" and error.source == str(tmp_path / "config.json")
    assert str(error).startswith(f"{tmp_path / 'config.json'}: config field 'omnikv.token_budget' = 1.5")


def test_a_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(json.dumps({"omnikv": {"wait_layers": 2}}).encode("utf-8-sig"))
    assert okv.load_config(path).omnikv.wait_layers == 2


def test_a_directory_is_not_a_config(tmp_path):
    with pytest.raises(okv.ConfigError, match="existing JSON file"):
        okv.load_config(tmp_path)


def test_a_deeply_nested_dict_is_a_config_error():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({"omnikv": {"selector": {"type": "last", "extra": deep}}})
    assert len(str(excinfo.value)) < 1000  # the value is shown cut short, not dumped


class _Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


@pytest.mark.parametrize(
    "config",
    [
        {1: 2},
        {"omnikv": {"selector": {"type": "h2o", 3: 1}}},
        {"omnikv": _Unprintable()},
        {"omnikv": {"selector": {"type": "h2o", "recent_ratio": _Unprintable()}}},
        {"omnikv": {"selector": {"type": "exp", "decay": 10**400}}},
        {"do_select_layers": "2", "rope_factor": 10**400},
        {"do_select_layers": "2", "model_cls": _Unprintable()},
        "{'omnikv': " + "x" * 5000 + "}",  # a string that is no file name the system allows
        "configs/../no\x00such.json",
    ],
    ids=[
        *("int-key", "int-argument", "unprintable", "unprintable-argument"),
        *("huge-decay", "huge-rope", "seed-unprintable", "long-name", "nul"),
    ],
)
def test_python_values_json_cannot_hold_are_config_errors(config):
    with pytest.raises(okv.ConfigError):
        okv.load_config(config)


# sizes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field", "allowed"),
    [
        ({"model": {"cpu_num_threads": 10**12}}, "model.cpu_num_threads", "less than or equal to 1024"),
        ({"model": {"max_context_len": 10**10}}, "model.max_context_len", "less than or equal to 16777216"),
        ({"omnikv": {"selector": {"type": "uniform", "window_size": 10**9}}}, "omnikv.selector.window_size", "4096"),
        ({"omnikv": {"selector": {"type": "quest", "page_size": 10**9}}}, "omnikv.selector.page_size", "1 to 4096"),
        ({"omnikv": {"selector": {"type": "infllm", "block_size": 10**9}}}, "omnikv.selector.block_size", "4096"),
        ({"omnikv": {"selector": {"type": "snapkv", "kernel_size": 10**9 + 1}}}, "omnikv.selector.kernel_size", "1023"),
        ({"omnikv": {"selector": {"type": "h2o", "window_size": 10**6}}}, "omnikv.selector.window_size", "4096"),
        ({"offload": {"hot_cache_tokens": 10**10}}, "offload.hot_cache_tokens", "16777216"),
        ({"profiling": {"interval_ms": float("inf")}}, "profiling.interval_ms", "less than or equal to 60000"),
        ({"profiling": {"interval_ms": float("nan")}}, "profiling.interval_ms", "greater than or equal to 1"),
        ({"profiling": {"interval_ms": 10**7}}, "profiling.interval_ms", "60000"),
        ({"profiling": {"interval_ms": 0.001}}, "profiling.interval_ms", "greater than or equal to 1"),
        ({"generation": {"max_new_tokens": 10**12}}, "generation.max_new_tokens", "16777216"),
        ({"generation": {"check_every": 10**12}}, "generation.check_every", "16777216"),
        ({"prefill": {"chunk_size": 10**12}}, "prefill.chunk_size", "16777216"),
        ({"omnikv": {"tail_tokens": 10**12}}, "omnikv.tail_tokens", "16777216"),
        ({"omnikv": {"min_token_budget": 10**12}}, "omnikv.min_token_budget", "16777216"),
        ({"omnikv": {"token_budget": 10**12}}, "omnikv.token_budget", "at most 16777216"),
        ({"omnikv": {"filter_layers": [2, 10**6]}}, "omnikv.filter_layers", "below 1024"),
        ({"omnikv": {"wait_layers": 10**6}}, "omnikv.wait_layers", "1024"),
        ({"do_select_layers": "2", "cpu_num_threads": 1e12}, "cpu_num_threads", "integer"),
        ({"do_select_layers": "2", "cpu_num_threads": 10**12}, "cpu_num_threads", "1024"),
    ],
)
def test_sizes_are_bounded_at_load(config, field, allowed):
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config(config)
    assert excinfo.value.field == field and allowed in str(excinfo.value), str(excinfo.value)


def test_the_profilers_own_settings_are_checked_like_the_configs():
    with pytest.raises(okv.ConfigError, match="profiling.interval_ms"):
        with profile_memory(config={"interval_ms": float("inf")}):
            pass


# code named in a config -----------------------------------------------------------------------------------


@pytest.fixture
def side_effect_module(tmp_path, monkeypatch):
    """A module on sys.path whose import writes a marker file; yields (module name, marker path)."""
    name = f"okv_side_effect_{uuid.uuid4().hex}"
    marker = tmp_path / "imported"
    source = f"""
from pathlib import Path
from omnikv_runtime.policies import EvictionPolicy, LastQueryPolicy
Path({str(marker)!r}).write_text("ran")


class Policy(LastQueryPolicy):
    name = "side_effect"


class Eviction(EvictionPolicy):
    def priority(self, state):
        return state["step"]
"""
    (tmp_path / f"{name}.py").write_text(source, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ({"omnikv": {"selector": "{}:Policy"}}, "omnikv.selector.type"),
        ({"offload": {"eviction": "{}:Eviction"}}, "offload.eviction.type"),
    ],
)
def test_code_named_in_a_config_is_not_imported_without_the_opt_in(side_effect_module, section, field):
    name, marker = side_effect_module
    config = json.loads(json.dumps(section).replace("{}", name))
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config(config)
    assert excinfo.value.field == field
    assert "trust_remote_code=True" in str(excinfo.value) and "--trust-remote-code" in str(excinfo.value)
    assert not marker.exists() and name not in sys.modules
    loaded = okv.load_config(config, trust_remote_code=True)
    assert marker.read_text() == "ran"
    assert okv.load_config(loaded) == loaded  # imported with the opt-in, the class now counts as registered


def test_a_rejected_config_imports_nothing_even_with_the_opt_in(side_effect_module):
    name, marker = side_effect_module
    with pytest.raises(okv.ConfigError, match="token_budget"):
        okv.load_config({"omnikv": {"token_budget": 1.5, "selector": f"{name}:Policy"}}, trust_remote_code=True)
    assert not marker.exists()


def test_the_zen_of_python_stays_quiet(capsys):
    already = "this" in sys.modules
    with pytest.raises(okv.ConfigError, match="trust_remote_code"):
        okv.load_config({"omnikv": {"selector": {"type": "this:X"}}})
    assert capsys.readouterr().out == ""
    assert ("this" in sys.modules) == already


def test_initialize_and_engine_need_the_opt_in(side_effect_module):
    name, marker = side_effect_module
    config = omni(budget=8, selector={"type": f"{name}:Policy"})
    with pytest.raises(okv.ConfigError, match="trust_remote_code"):
        okv.initialize(make_model("llama"), config)
    with pytest.raises(okv.ConfigError, match="trust_remote_code"):  # a config object built by hand
        Engine(make_model("llama"), OmniKVConfig.model_validate(config))
    assert not marker.exists()
    engine = okv.initialize(make_model("llama"), config, trust_remote_code=True)
    assert type(engine.policy).__module__ == name and marker.exists()


def test_the_command_line_needs_the_flag(side_effect_module, tmp_path, capsys):
    name, marker = side_effect_module
    path = tmp_path / "user.json"
    path.write_text(json.dumps({"omnikv": {"filter_layers": [2, 6, 18], "selector": f"{name}:Policy"}}))
    command = ["plan", "--config", str(path), "--context", "2000", "--json"]
    assert cli.main(command) == 2
    err = capsys.readouterr().err
    assert "--trust-remote-code" in err and str(path) in err and "Traceback" not in err
    assert not marker.exists()
    assert cli.main([*command, "--trust-remote-code"]) == 0
    assert marker.exists() and json.loads(capsys.readouterr().out)["context"] == 2000


def test_every_command_that_loads_a_config_has_the_flag(capsys):
    parser = cli.build_parser()
    for command in cli.CONFIG_COMMANDS:
        with pytest.raises(SystemExit):
            parser.parse_args([command, "--help"])
        assert "--trust-remote-code" in capsys.readouterr().out, command


def test_the_policy_docs_explain_the_opt_in():
    text = DOCS.read_text(encoding="utf-8")
    assert "trust_remote_code=True" in text and "--trust-remote-code" in text

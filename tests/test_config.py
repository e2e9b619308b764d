"""Config loading and checking: every bad field is an okv.ConfigError naming field, value and what is allowed."""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import pytest
import torch
from okv_testlib import PLAN, PROMPT_LEN, is_sparse, make_model, omni, split_forwards
from pydantic import BaseModel, Field

import omnikv_runtime as okv
from omnikv_runtime.config import OmniKVConfig
from omnikv_runtime.config import doc as config_doc

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(CONFIG_DIR.glob("*.json"))


def _assert_config_error(excinfo, field: str, value, *allowed: str) -> None:
    error = excinfo.value
    assert isinstance(error, okv.ConfigError) and isinstance(error, ValueError)
    message = str(error)
    assert error.field == field
    assert f"'{field}'" in message
    assert repr(value) in message
    for fragment in allowed:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_config_error_is_a_value_error():
    assert issubclass(okv.ConfigError, ValueError)
    assert issubclass(okv.ConfigError, okv.OmniKVError)


# checks that need the model ---------------------------------------------------------------------------


def test_filter_layer_out_of_range_is_caught_at_initialize(tiny_llama):
    config = omni()
    config["omnikv"]["filter_layers"] = [1, 8]
    okv.load_config(config)  # the config alone cannot know the model has 8 layers
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.initialize(tiny_llama, config)
    _assert_config_error(excinfo, "omnikv.filter_layers", [1, 8], "0..7", "has 8")
    assert tiny_llama.config._attn_implementation == "sdpa"  # a failed initialize leaves the model alone


@pytest.mark.parametrize(
    ("filter_layers", "wait", "plan", "dense_segments", "equivalent"),
    [
        ([1, 2], 1, "DDFWssss", [1], {"filter_layers": [2], "wait_layers": 1}),  # adjacent filter layers
        ([1, 4], 2, "DDDDFWWs", [1], {"filter_layers": [4], "wait_layers": 2}),  # wait layers reach layer 4
        ([1, 4], 3, "DDDDDDDD", [1, 4], {"enabled": False}),
        ([1, 6], 1, "DFWsssDD", [6], None),  # wait layer 7 is the last layer
        ([7], 0, "DDDDDDDD", [7], {"enabled": False}),
    ],
)
def test_a_segment_without_sparse_layers_runs_dense(
    caplog, attention_spy, prompt_factory, filter_layers, wait, plan, dense_segments, equivalent
):
    """As in the original OmniKV, a segment whose wait layers leave no sparse layer runs dense: one log line
    per such segment, full attention in its layers, and the tokens of a config without that filter layer."""
    ids, mask = prompt_factory(batch=2)
    budget, steps = 6, 5
    section = {"filter_layers": filter_layers, "wait_layers": wait, "token_budget": budget}
    with caplog.at_level(logging.INFO, logger="omnikv_runtime.config"):
        engine = okv.initialize(make_model("llama"), {"omnikv": section})
    assert engine.plan.describe() == plan
    for layer in dense_segments:
        assert f"filter layer {layer}: its segment" in caplog.text and "runs dense" in caplog.text
    assert ("every layer runs dense" in caplog.text) == (plan == "DDDDDDDD")
    calls = attention_spy()
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=steps)
    for step, forward in enumerate(split_forwards(calls)[1:], start=1):
        for call in forward:  # only the plan's sparse layers read a selection
            expected = budget + step if is_sparse(engine, call.layer) else PROMPT_LEN + step
            assert call.attended == expected, (step, call)
    if equivalent is not None:
        reference = okv.initialize(make_model("llama"), {"omnikv": {"token_budget": budget, **equivalent}})
        assert reference.plan.describe() == plan
        assert torch.equal(out, reference.generate(ids, attention_mask=mask, max_new_tokens=steps))


def test_valid_layout_builds_the_expected_plan(tiny_llama):
    engine = okv.initialize(tiny_llama, omni())
    assert engine.plan.describe() == PLAN
    assert engine.describe_layers() == {"dense": [0], "filter": [1, 4], "wait": [2, 5], "sparse": [3, 6, 7]}


@pytest.mark.parametrize(
    ("budget", "minimum", "context", "tokens"),
    [
        (0.2, 1, 40, 8),
        (0.1, 1, 30, 3),
        (0.5, 1, 41, 20),  # rounds down, as the original's int(fraction * prompt_len)
        (0.067, 1, 1000, 67),
        (0.067, 1, 40, 2),
        (0.29, 1, 100, 28),  # 0.29 * 100 is 28.999999999999996 in floating point: the original's int() gives 28
        (0.01, 1, 40, 1),  # int() gives 0: the floor of one token
        (0.067, 64, 1000, 67),  # the floor does not bind
        (0.067, 64, 40, 40),  # a short prompt: the floor selects everything
        (0.067, 64, 500, 64),
        (1.0, 64, 40, 40),
        (8, 64, 40, 8),  # a count is taken as given; the floor is for fractions
        (8, 1, 5, 5),
    ],
)
def test_token_budget_for(budget, minimum, context, tokens):
    """A fraction takes int(fraction * context), at least min_token_budget; a count is capped by the context."""
    section = {"token_budget": budget, "min_token_budget": minimum}
    assert okv.load_config({"omnikv": section}).omnikv.token_budget_for(context) == tokens


# checks of the config alone ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("omnikv", "field", "value", "allowed"),
    [
        ({"filter_layers": [4, 1]}, "omnikv.filter_layers", [4, 1], "increasing order"),
        ({"filter_layers": [1, 1]}, "omnikv.filter_layers", [1, 1], "must not repeat"),
        ({"filter_layers": [1, 4, 4]}, "omnikv.filter_layers", [1, 4, 4], "must not repeat"),
        ({"filter_layers": [-1, 2]}, "omnikv.filter_layers", [-1, 2], "start at 0"),
        ({"filter_layers": []}, "omnikv.filter_layers", [], "at least one filter layer"),
        ({"token_budget": 0}, "omnikv.token_budget", 0, "at least 1"),
        ({"token_budget": -5}, "omnikv.token_budget", -5, "at least 1"),
        ({"token_budget": 0.0}, "omnikv.token_budget", 0.0, "(0, 1]"),
        ({"token_budget": -0.5}, "omnikv.token_budget", -0.5, "(0, 1]"),
        ({"token_budget": 1.5}, "omnikv.token_budget", 1.5, "(0, 1]"),
        ({"wait_layers": -1}, "omnikv.wait_layers", -1, "greater than or equal to 0"),
        ({"selector": {"type": "last", "window_size": 0}}, "omnikv.selector.window_size", 0, "greater than 0"),
    ],
)
def test_bad_omnikv_fields(omnikv, field, value, allowed):
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({"omnikv": omnikv})
    _assert_config_error(excinfo, field, value, allowed)


@pytest.mark.parametrize(
    ("config", "field", "value", "suggestion"),
    [
        ({"omnikv": {"token_budgett": 8}}, "omnikv.token_budgett", 8, "token_budget"),
        ({"omnikv": {"filter_layer": [1]}}, "omnikv.filter_layer", [1], "filter_layers"),
        ({"offload": {"pin_memmory": True}}, "offload.pin_memmory", True, "pin_memory"),
        ({"omnkv": {}}, "omnkv", {}, "omnikv"),
    ],
)
def test_unknown_key_suggests_a_name(config, field, value, suggestion):
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config(config)
    _assert_config_error(excinfo, field, value, "unknown key", f"did you mean '{suggestion}'")


def test_unknown_offload_device():
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({"offload": {"device": "gpu"}})
    _assert_config_error(excinfo, "offload.device", "gpu", "'cpu'", "'none'")


@pytest.mark.parametrize("dtype", ["float64", "fp16", "int8"])
def test_bad_dtype(dtype):
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({"model": {"dtype": dtype}})
    _assert_config_error(excinfo, "model.dtype", dtype, "'float32'", "'bfloat16'", "'float16'")


def test_bad_json_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"omnikv": {"token_budget": 8,}}', encoding="utf-8")
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config(path)
    _assert_config_error(excinfo, "<file>", str(path), "valid JSON", "line 1")


def test_json_that_is_not_an_object(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config(str(path))
    _assert_config_error(excinfo, "<file>", str(path), "JSON object")


@pytest.mark.parametrize("missing", ["no/such/config.json", "no_such_bundled_config"])
def test_missing_file(missing):
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config(missing)
    _assert_config_error(excinfo, "<file>", missing, "existing JSON file")


def test_config_of_a_wrong_type():
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config(42)
    assert "a path, a dict or an OmniKVConfig" in str(excinfo.value)


# legacy (seed OmniKV) format --------------------------------------------------------------------------


def test_legacy_example_maps_to_the_default_omnikv_section():
    legacy = okv.load_config(CONFIG_DIR / "legacy_example.json")
    default = okv.load_config(CONFIG_DIR / "default.json")
    # the seed's window_size 16 has no effect with `last` (it reads the current query only): it is not passed on;
    # a seed config has no budget floor, as in the original (the sectioned default floors at 64 tokens)
    assert legacy.omnikv.model_dump() == default.omnikv.model_dump() | {"min_token_budget": 0}
    assert default.omnikv.selector.window_size is None
    assert legacy.omnikv.filter_layers == [2, 6, 18]
    assert legacy.omnikv.wait_layers == 1
    assert legacy.omnikv.token_budget == 0.067
    assert (legacy.omnikv.selector.type, legacy.omnikv.selector.window_size) == ("last", None)
    assert legacy.model.max_context_len == 8192
    assert legacy.model.cpu_num_threads == 2
    assert legacy.model.attn_implementation == "sdpa"
    assert legacy.model.quantization == "none"
    assert legacy.offload.device == "cpu"


def test_legacy_value_conversions():
    config = okv.load_config(
        {"do_select_layers": "3, 9", "num_of_selected_tokens": 512, "real_offload": False, "use_flash_attn": True}
    )
    assert config.omnikv.filter_layers == [3, 9]
    assert config.omnikv.token_budget == 512
    assert config.offload.device == "none"
    assert config.model.attn_implementation == "flash_attention_2"


def test_legacy_unknown_key_suggests_a_name():
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({"do_select_layers": "2,8", "num_wait_load_layer": 1})
    _assert_config_error(excinfo, "num_wait_load_layer", 1, "did you mean 'num_wait_load_layers'")


def test_legacy_bad_layer_list():
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({"do_select_layers": "2,x"})
    _assert_config_error(excinfo, "do_select_layers", "2,x", "comma-separated")


@pytest.mark.parametrize(("key", "mode"), [("load_in_8bit", "8bit"), ("load_in_4bit", "4bit")])
def test_legacy_quantization_needs_bitsandbytes(key, mode):
    config = {"do_select_layers": "2,8", key: True}
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(okv.ConfigError) as excinfo:
            okv.load_config(config)
        _assert_config_error(excinfo, key, True, "bitsandbytes")
    else:
        assert okv.load_config(config).model.quantization == mode


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_sectioned_quantization_needs_bitsandbytes(mode):
    config = {"model": {"quantization": mode}}
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(okv.ConfigError) as excinfo:
            okv.load_config(config)
        _assert_config_error(excinfo, "model.quantization", mode, "bitsandbytes")
    else:
        assert okv.load_config(config).model.quantization == mode


# every way of handing a config ------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    assert len(CONFIG_FILES) >= 5
    config = okv.load_config(path)
    assert isinstance(config, OmniKVConfig)
    assert okv.load_config(path.stem) == config  # also by bundled name
    assert okv.load_config(str(path)) == config


def test_a_config_may_be_a_path_a_dict_an_object_or_a_name():
    path = CONFIG_DIR / "default.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    by_path, by_str, by_dict, by_name = (okv.load_config(s) for s in (path, str(path), data, "default"))
    by_object = okv.load_config(by_path)
    assert by_path == by_str == by_dict == by_name == by_object
    offload = by_dict.to_dict()["offload"]
    assert {key: offload[key] for key in data["offload"]} == data["offload"]  # the file's own keys, kept as written
    assert by_path.omnikv.filter_layers == data["omnikv"]["filter_layers"]
    assert by_object is not by_path
    by_object.omnikv.filter_layers.append(30)
    assert by_path.omnikv.filter_layers == [2, 6, 18]  # a deep copy


def test_initialize_accepts_every_config_form(tmp_path, tiny_llama):
    data = omni(budget=8)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    for source in (data, path, str(path), okv.load_config(data)):
        engine = okv.initialize(tiny_llama, source)
        assert engine.plan.describe() == PLAN
        assert engine.config.omnikv.token_budget == 8


def test_empty_config_takes_the_defaults():
    assert okv.load_config({}) == okv.load_config(None) == OmniKVConfig()
    assert okv.load_config({}).omnikv.filter_layers == [2, 8, 18]


# the schema is the one account of each field ------------------------------------------------------------


def test_readme_config_table_is_generated_from_the_schema():
    readme = (CONFIG_DIR.parent / "README.md").read_text(encoding="utf-8")
    assert config_doc.START in readme and config_doc.END in readme
    assert config_doc.replace_table(readme) == readme, (
        "README's config table is not the schema's: run `python -m omnikv_runtime.config.doc --write README.md`"
    )


def test_every_config_field_is_in_the_table_with_its_default():
    rows = {path.strip("`"): (default, meaning) for path, default, meaning in config_doc.config_rows()}
    config = OmniKVConfig().model_dump(mode="json")
    for section, fields in config.items():
        for name, value in fields.items():
            default, meaning = rows[f"{section}.{name}"]
            assert default == f"`{json.dumps(value)}`" and meaning
    assert rows["omnikv.selector.type"][0] == '`"last"`' and "offload.eviction.type" in rows


def test_a_field_without_a_description_is_refused():
    class Section(BaseModel):
        described: int = Field(default=1, description="a number")
        bare: int = 2

    class Config(BaseModel):
        section: Section = Field(default_factory=Section)

    with pytest.raises(ValueError, match="section.bare has no description"):
        config_doc.config_rows(Config)

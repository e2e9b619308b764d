"""The original OmniKV's flat config format: every key its code reads is mapped, inert (one log line) or refused."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import omnikv_runtime as okv
from omnikv_runtime.config.legacy import SEED_KEYS

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "example.json"  # the original's, keys and values
BASE = {"do_select_layers": "2,8,18", "num_wait_load_layers": 1, "num_of_selected_tokens": 0.067}
BASE |= {"selector_cls": "last"}  # with these four written out, no seed default applies

# the keys of the original's example config, and the other keys its code reads
EXAMPLE_KEYS = (
    "cpu_num_threads use_chat_template cot max_context_len model_name load_in_8bit load_in_4bit model_cls "
    "cache_cls use_flash_attn do_select_layers num_wait_load_layers real_offload dense_more "
    "num_of_selected_tokens selector_cls window_size"
).split()
OTHER_KEYS = (
    "decoder_start_layer_idx offload_sid sparse_in_prefill skip_prefill num_sink_tokens sink_window_length "
    "use_sink_cache use_sink skip_threshold seg_size attn_seg_sz max_len_can_hold ensure_head_tail_len "
    "rope_factor ntk_factor pretraining_tp use_gptq use_fixed_prompt infllm_cfg_path use_multi_gpus n_gpu seed "
    "hh_ratio recent_ratio batch_size"
).split()


def latency_config(**changes) -> dict:
    """The config the original's ``tiny_runs/end_to_end_latency_test.py`` writes, with its defaults
    (context_len 128, num_sel_tokens 0.016, h2o_ratio 0.3, h2o_seg_sz 'auto', cpu_num_threads 12)."""
    config = {
        "batch_size": 1,
        "model_name": "/input/jitai/huggingface/hub/Lourdle/Llama-3-8B-Instruct-262k",
        "model_cls": "multi",
        "max_context_len": 128000,
        "rope_factor": -1,
        "do_select_layers": "2,8,18",
        "num_wait_load_layers": 1,
        "num_of_selected_tokens": 0.016,
        "dense_more": True,
        "cache_cls": "multi",
        "real_offload": True,
        "selector_cls": "last",
        "hh_ratio": 0.15,
        "recent_ratio": 0.15,
        "seg_size": "auto",
        "skip_prefill": True,
        "decoder_start_layer_idx": 6,
        "offload_sid": 10,
        "infllm_cfg_path": None,
        "use_multi_gpus": False,
        "load_in_4bit": False,
        "use_flash_attn": True,
        "use_fixed_prompt": True,
        "use_chat_template": False,
        "cpu_num_threads": 12,
    }
    return config | changes


def _load(caplog, extra: dict) -> okv.OmniKVConfig:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="omnikv_runtime.config.legacy"):
        return okv.load_config({**BASE, **extra})


def test_the_original_example_loads_with_its_values(caplog):
    with caplog.at_level(logging.INFO, logger="omnikv_runtime"):
        config = okv.load_config(EXAMPLE)
    assert config.model.cpu_num_threads == 8
    assert config.generation.use_chat_template is False and config.generation.cot is False
    assert config.model.max_context_len == 128500
    assert config.model.name_or_path == "../models/Llama-3-8B-Instruct-262k"
    assert config.model.quantization == "none"
    assert config.model.attn_implementation == "flash_attention_2"
    assert config.omnikv.enabled and config.omnikv.filter_layers == [2, 8, 18]
    assert config.omnikv.wait_layers == 1 and config.omnikv.token_budget == 0.067
    assert config.offload.device == "none"  # real_offload false
    # the original's `last` ignores its window_size 16: here no policy takes an argument it ignores
    assert (config.omnikv.selector.type, config.omnikv.selector.window_size) == ("last", None)
    inert = [r.getMessage() for r in caplog.records if "has no effect here" in r.getMessage()]
    assert len(inert) == 4 and all(any(f"'{key}'" in line for line in inert) for key in ("model_cls", "cache_cls"))
    assert any("'dense_more'" in line for line in inert)
    assert any("'window_size' = 16" in line and "selector 'last'" in line for line in inert)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # the budget the original uses: int(0.067 * L), with no floor (the runtime's own format floors it at 64)
    assert config.omnikv.min_token_budget == 0
    assert [config.omnikv.token_budget_for(length) for length in (300, 955, 3000)] == [20, 63, 201]
    assert okv.load_config("example") == config  # shipped as configs/example.json, a bundled name


def test_the_config_the_originals_latency_script_writes_loads(caplog):
    with caplog.at_level(logging.INFO, logger="omnikv_runtime"):
        config = okv.load_config(latency_config())
    assert config.omnikv.token_budget == 0.016 and config.omnikv.min_token_budget == 0
    # the original selects int(0.016 * L): 16, 31 and 47 tokens for these prompts
    assert [config.omnikv.token_budget_for(length) for length in (1000, 1999, 2999)] == [16, 31, 47]
    assert config.offload.device == "cpu" and config.model.max_context_len == 128000
    assert (config.omnikv.selector.type, config.omnikv.filter_layers) == ("last", [2, 8, 18])
    text = caplog.text
    for key in ("batch_size", "seg_size", "infllm_cfg_path", "use_multi_gpus", "hh_ratio", "recent_ratio"):
        assert f"'{key}'" in text, key
    assert "H2O baseline reads it, and the selector is 'last'" in text
    # the script's other runs: its dense model on two GPUs loads; the baselines it compares are refused
    assert okv.load_config(latency_config(model_cls="raw_llama", use_multi_gpus=True)).omnikv.enabled is False
    assert okv.load_config(latency_config(cache_cls="without_pack", real_offload=False)).offload.device == "none"
    for model_cls, reason in (("h2o", "H2O"), ("brutal_offload", "without selecting"), ("infllm", "InfLLM")):
        with pytest.raises(okv.ConfigError) as excinfo:
            okv.load_config(latency_config(model_cls=model_cls))
        assert excinfo.value.field == "model_cls" and reason in str(excinfo.value)


def test_a_seed_config_has_no_budget_floor_unless_it_asks_for_one():
    seed = okv.load_config(BASE)
    sectioned = okv.load_config({"omnikv": {"filter_layers": [2, 8, 18], "token_budget": 0.067}})
    assert (seed.omnikv.token_budget_for(300), sectioned.omnikv.token_budget_for(300)) == (20, 64)
    floored = okv.load_config({**BASE, "omnikv": {"min_token_budget": 32}})
    assert floored.omnikv.token_budget_for(300) == 32 and floored.omnikv.token_budget_for(1000) == 67


H2O_SEED = {"do_select_layers": "2,8,18", "num_wait_load_layers": 1, "selector_cls": "h2o"}


def test_the_h2o_ratios_set_the_h2o_selector(caplog):
    """The seed's H2O keeps hh_ratio of the prompt as heavy hitters and recent_ratio as the latest tokens."""
    with caplog.at_level(logging.INFO, logger="omnikv_runtime.config.legacy"):
        config = okv.load_config({**H2O_SEED, "hh_ratio": 0.1, "recent_ratio": 0.3})
    assert config.omnikv.selector.type == "h2o"
    assert config.omnikv.token_budget == pytest.approx(0.4) and config.omnikv.min_token_budget == 0
    assert config.omnikv.selector.model_dump()["recent_ratio"] == pytest.approx(0.75)
    assert "set selector 'h2o'" in caplog.text and "compresses every layer" in caplog.text
    assert config.omnikv.token_budget_for(1000) == 400  # int(0.1 * 1000) + int(0.3 * 1000) in the seed


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        ({"hh_ratio": 0.1}, "hh_ratio", "given with recent_ratio too"),
        ({"recent_ratio": 0.1}, "recent_ratio", "given with hh_ratio too"),
        ({"hh_ratio": 0.1, "recent_ratio": 0.1, "num_of_selected_tokens": 512}, "hh_ratio", "set it too"),
        ({"hh_ratio": 0.0, "recent_ratio": 0.0}, "hh_ratio", "summing to (0, 1]"),
        ({"hh_ratio": 0.7, "recent_ratio": 0.6}, "hh_ratio", "summing to (0, 1]"),
        ({"hh_ratio": 1.5, "recent_ratio": 0.1}, "hh_ratio", "a fraction of the prompt"),
        ({"hh_ratio": "0.1", "recent_ratio": 0.1}, "hh_ratio", "a finite number"),
    ],
)
def test_bad_h2o_ratios_are_refused(extra, key, reason):
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({**H2O_SEED, **extra})
    assert excinfo.value.field == key and reason in str(excinfo.value)


def test_every_key_the_original_reads_is_known():
    assert set(EXAMPLE_KEYS) | set(OTHER_KEYS) <= SEED_KEYS
    assert len(EXAMPLE_KEYS) == 17 and len(OTHER_KEYS) == 25
    assert set(latency_config()) <= SEED_KEYS


@pytest.mark.parametrize(
    ("key", "value", "field", "expected"),
    [
        ("cpu_num_threads", 4, "model.cpu_num_threads", 4),
        ("use_chat_template", True, "generation.use_chat_template", True),
        ("cot", True, "generation.cot", True),
        ("max_context_len", 4096, "model.max_context_len", 4096),
        ("model_name", "some/model", "model.name_or_path", "some/model"),
        ("load_in_8bit", False, "model.quantization", "none"),
        ("load_in_4bit", False, "model.quantization", "none"),
        ("use_flash_attn", False, "model.attn_implementation", "sdpa"),
        ("use_flash_attn", True, "model.attn_implementation", "flash_attention_2"),
        ("do_select_layers", "3,9", "omnikv.filter_layers", [3, 9]),
        ("num_wait_load_layers", 2, "omnikv.wait_layers", 2),
        ("real_offload", True, "offload.device", "cpu"),
        ("real_offload", False, "offload.device", "none"),
        ("num_of_selected_tokens", 512, "omnikv.token_budget", 512),
        ("selector_cls", "uniform", "omnikv.selector.type", "uniform"),
        ("selector_cls", "softmax_before_last", "omnikv.selector.type", "softmax_last"),
        ("model_cls", "raw_llama", "omnikv.enabled", False),  # the original's dense model
        ("model_cls", "llama3_262k", "omnikv.enabled", False),
    ],
)
def test_mapped_keys(caplog, key, value, field, expected):
    config = _load(caplog, {key: value})
    section, *path = field.split(".")
    found = getattr(config, section)
    for name in path:
        found = getattr(found, name)
    assert found == expected


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("model_cls", "multi"),
        ("model_cls", "qwen_multi"),
        ("cache_cls", "multi"),
        ("cache_cls", "without_pack"),
        ("dense_more", True),
        ("decoder_start_layer_idx", 12),
        ("offload_sid", 12),
        ("sparse_in_prefill", True),
        ("sparse_in_prefill", False),
        ("skip_prefill", True),
        ("num_sink_tokens", 128),
        ("sink_window_length", 1024),
        ("use_sink_cache", False),
        ("use_sink", False),
        ("skip_threshold", 0.4),
        ("seg_size", 8000),
        ("attn_seg_sz", 8000),
        ("max_len_can_hold", 32000),
        ("ensure_head_tail_len", 128),
        ("rope_factor", -1),
        ("ntk_factor", 8.0),
        ("pretraining_tp", 1),
        ("use_gptq", False),
        ("use_gptq", True),  # without load_in_4bit the original ignores it too
        ("use_fixed_prompt", True),
        ("infllm_cfg_path", "config/llama-3-inf-llm.yaml"),
        ("infllm_cfg_path", None),  # the latency script writes null when it runs no InfLLM
        ("seg_size", "auto"),
        ("seg_size", "auto_70B"),
        ("batch_size", 1),
        ("use_multi_gpus", True),
        ("use_multi_gpus", False),
        ("n_gpu", 2),
        ("seed", 7),
        ("hh_ratio", 0.15),  # with a selector other than h2o
        ("recent_ratio", 0.15),
    ],
)
def test_inert_keys_are_accepted_with_one_log_line(caplog, key, value):
    base = okv.load_config(BASE)
    config = _load(caplog, {key: value})
    assert config == base  # no effect on the config
    lines = [r.getMessage() for r in caplog.records if f"'{key}'" in r.getMessage()]
    assert len(lines) == 1 and "has no effect here" in lines[0], caplog.text


@pytest.mark.parametrize(
    ("extra", "key", "reason"),
    [
        ({"cache_cls": "lazy"}, "cache_cls", "skip_threshold"),
        ({"cache_cls": "default"}, "cache_cls", "select-once"),
        ({"cache_cls": "eff"}, "cache_cls", "select-once"),
        ({"cache_cls": "mult"}, "cache_cls", "did you mean 'multi'"),
        ({"model_cls": "token"}, "model_cls", "every layer"),
        ({"model_cls": "token_once"}, "model_cls", "selects once"),
        ({"model_cls": "h2o"}, "model_cls", "H2O"),
        ({"model_cls": "infllm"}, "model_cls", "InfLLM"),
        ({"model_cls": "brutal_offload"}, "model_cls", "without selecting"),
        ({"model_cls": "something"}, "model_cls", "not a model class"),
        ({"dense_more": False}, "dense_more", "the original raises"),
        ({"use_sink_cache": True}, "use_sink_cache", "adds no sinks"),
        ({"use_sink": True}, "use_sink", "streaming_llm"),
        ({"rope_factor": 8.0}, "rope_factor", "rope_scaling"),
        ({"pretraining_tp": 2}, "pretraining_tp", "NotImplementedError"),
        ({"use_gptq": True, "load_in_4bit": True}, "use_gptq", "GPTQ"),
        ({"use_fixed_prompt": False}, "use_fixed_prompt", "asserts"),
    ],
)
def test_keys_that_would_change_results_are_refused(extra, key, reason):
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({**BASE, **extra})
    assert excinfo.value.field == key and repr(extra[key]) in str(excinfo.value)
    assert reason in str(excinfo.value)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("seg_size", "big", "an integer, 'auto' or 'auto_70B'"),
        ("seg_size", 2.5, "an integer, 'auto' or 'auto_70B'"),
        ("infllm_cfg_path", 3, "a string or null"),
        ("batch_size", "1", "an integer"),
        ("use_multi_gpus", "maybe", "true or false"),
        ("hh_ratio", -0.1, "a fraction of the prompt"),
    ],
)
def test_inert_keys_check_their_values(key, value, allowed):
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({**BASE, key: value})
    assert excinfo.value.field == key and allowed in str(excinfo.value)


def test_a_dense_model_needs_no_cache_class(caplog):
    config = _load(caplog, {"model_cls": "raw_llama", "cache_cls": "default"})
    assert config.omnikv.enabled is False
    assert "dense model does not use it" in caplog.text


# booleans ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "field"),
    [("real_offload", "offload.device"), ("use_flash_attn", "model.attn_implementation")],
)
def test_booleans_are_parsed_not_tested_for_truth(key, field):
    """`"false"` is false, as in the sectioned format; before, any non-empty string was true."""
    section, name = field.split(".")

    def mapped(value):
        return getattr(getattr(okv.load_config({**BASE, key: value}), section), name)

    assert mapped("false") == mapped(False) != mapped(True) == mapped("true")
    sectioned = okv.load_config({"offload": {"pin_memory": "false"}}).offload.pin_memory
    assert sectioned is False  # the same parser


BOOLEAN_KEYS = (
    "use_chat_template cot load_in_8bit load_in_4bit use_flash_attn real_offload dense_more sparse_in_prefill "
    "skip_prefill use_sink_cache use_sink use_gptq use_fixed_prompt use_multi_gpus"
).split()


@pytest.mark.parametrize("key", BOOLEAN_KEYS)
@pytest.mark.parametrize("value", ["maybe", 2, None, [], {"a": 1}, 0.5])
def test_a_boolean_key_refuses_what_is_not_a_boolean(key, value):
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({**BASE, key: value})
    assert excinfo.value.field == key and "true or false" in str(excinfo.value)


# layers, defaults, sections ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "layers"), [("2,3", [2, 3]), (" 2 , 8 ,18", [2, 8, 18]), ("4,", [4]), ([2, 8], [2, 8]), (5, [5])]
)
def test_filter_layers_are_read_as_the_original_reads_them(value, layers):
    assert okv.load_config({**BASE, "do_select_layers": value}).omnikv.filter_layers == layers


@pytest.mark.parametrize("value", ["2,x", "+3", "\u0663", "3_0", "1" * 5000, 2.5, True, None, "8,2", ["a"], [-1]])
def test_bad_filter_layers_name_the_seed_key(value):
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({**BASE, "do_select_layers": value})
    assert excinfo.value.field == "do_select_layers"


@pytest.mark.parametrize(
    ("key", "value", "sectioned"),
    [
        ("num_wait_load_layers", -1, "omnikv.wait_layers"),
        ("num_of_selected_tokens", 1.5, "omnikv.token_budget"),
        ("cpu_num_threads", 10**12, "model.cpu_num_threads"),
        ("model_name", 7, "model.name_or_path"),
    ],
)
def test_errors_of_mapped_keys_name_the_seed_key(key, value, sectioned):
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({**BASE, key: value})
    assert excinfo.value.field == key and f"it sets {sectioned} here" in str(excinfo.value)


@pytest.mark.parametrize("selector", ["uniform", "exp"])
def test_the_seed_window_goes_to_the_window_selectors(caplog, selector):
    config = _load(caplog, {"selector_cls": selector, "window_size": 8})
    assert (config.omnikv.selector.type, config.omnikv.selector.window_size) == (selector, 8)
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({**BASE, "selector_cls": selector, "window_size": 0})
    assert excinfo.value.field == "window_size" and "it sets omnikv.selector.window_size here" in str(excinfo.value)


@pytest.mark.parametrize("selector", ["last", "softmax_before_last"])
def test_the_seed_window_has_no_effect_on_the_current_query_selectors(caplog, selector):
    config = _load(caplog, {"selector_cls": selector, "window_size": 8})
    assert config.omnikv.selector.window_size is None
    assert "'window_size' = 8 has no effect here" in caplog.text
    with pytest.raises(okv.ConfigError) as excinfo:  # its value is checked all the same
        okv.load_config({**BASE, "selector_cls": selector, "window_size": 0})
    assert excinfo.value.field == "window_size" and "from 1 to 4096" in str(excinfo.value)


def test_keys_left_out_take_the_originals_defaults(caplog):
    with caplog.at_level(logging.INFO, logger="omnikv_runtime.config.legacy"):
        config = okv.load_config({"do_select_layers": "2,8,18"})
    assert config.omnikv.wait_layers == 2  # num_wait_load_layers defaults to 2 in the original
    assert config.omnikv.token_budget == 4096  # num_of_selected_tokens: 4096 tokens
    assert config.omnikv.selector.type == "softmax_last"  # selector_cls: softmax_before_last
    assert "the original's defaults" in caplog.text


def test_a_seed_config_may_carry_runtime_sections():
    config = okv.load_config({**BASE, "profiling": {"interval_ms": 5, "png": False}, "prefill": {"chunk_size": 512}})
    assert config.profiling.interval_ms == 5 and config.profiling.png is False
    assert config.prefill.chunk_size == 512 and config.omnikv.filter_layers == [2, 8, 18]
    merged = okv.load_config({**BASE, "omnikv": {"tail_tokens": 8}})
    assert merged.omnikv.tail_tokens == 8 and merged.omnikv.wait_layers == 1
    # a section's own field wins over nothing: the seed default of a field the section sets does not apply
    assert okv.load_config({"do_select_layers": "2,8", "omnikv": {"wait_layers": 0}}).omnikv.wait_layers == 0


def test_a_field_set_by_a_seed_key_and_a_section_is_refused():
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({**BASE, "omnikv": {"wait_layers": 2}})
    assert excinfo.value.field == "omnikv.wait_layers" and "num_wait_load_layers" in str(excinfo.value)
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({**BASE, "profiling": 3})
    assert excinfo.value.field == "profiling"


def test_an_unknown_key_in_a_seed_config_suggests_a_name():
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({**BASE, "sparse_in_prefil": True})
    assert excinfo.value.field == "sparse_in_prefil" and "did you mean 'sparse_in_prefill'" in str(excinfo.value)

"""The seed OmniKV's flat JSON config, mapped onto :class:`~omnikv_runtime.config.OmniKVConfig`.

Seed configs look like ``{"model_name": ..., "do_select_layers": "2,8,18",
"num_of_selected_tokens": 0.067, "real_offload": true, ...}``. Every key the original code reads
is handled in one of three ways:

- mapped onto a field of the sectioned config (:data:`MAPPED`);
- accepted with one log line saying why it has no effect here (:data:`NO_EFFECT`, and the values
  of :data:`CONDITIONAL` keys that ask for nothing this runtime would do differently);
- refused with a :class:`ConfigError` giving the reason, where ignoring it would change results
  (a ``cache_cls`` that names another cache variant, sinks, RoPE scaling, ...).

Booleans are parsed as the sectioned format parses them (``"false"`` is false; ``"maybe"`` is an
error). Keys the original leaves out take the original's defaults (:data:`SEED_DEFAULTS`), and a
fractional budget has no floor (``omnikv.min_token_budget = 0``), as in the original, unless the
config's ``omnikv`` section sets one. The H2O ratios (``hh_ratio``, ``recent_ratio``) configure this
runtime's ``h2o`` selector when the config selects it (:func:`_h2o_ratios`). A seed config may also
carry sections of this runtime (``profiling``, ``prefill``, ...); they merge with what the seed keys
map to, and a field set both ways is refused. Unknown keys raise a ConfigError with a did-you-mean.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from omnikv_runtime.config.sections import BITSANDBYTES_MISSING, MAX_WINDOW, bitsandbytes_installed
from omnikv_runtime.errors import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

# seed key -> (section, field) of the sectioned config; values that need converting are handled in _map
MAPPED: dict[str, tuple[str, str]] = {
    "model_name": ("model", "name_or_path"),
    "max_context_len": ("model", "max_context_len"),
    "cpu_num_threads": ("model", "cpu_num_threads"),
    "use_flash_attn": ("model", "attn_implementation"),
    "load_in_8bit": ("model", "quantization"),
    "load_in_4bit": ("model", "quantization"),
    "do_select_layers": ("omnikv", "filter_layers"),
    "num_wait_load_layers": ("omnikv", "wait_layers"),
    "num_of_selected_tokens": ("omnikv", "token_budget"),
    "selector_cls": ("omnikv", "selector"),
    "window_size": ("omnikv", "selector"),
    "real_offload": ("offload", "device"),
    "use_chat_template": ("generation", "use_chat_template"),
    "cot": ("generation", "cot"),
}
LEGACY_KEYS = MAPPED  # the name earlier versions exported

# what the original code uses for a key its config leaves out, where this runtime's default differs
SEED_DEFAULTS: dict[str, Any] = {
    "num_wait_load_layers": 2,
    "num_of_selected_tokens": 4096,
    "selector_cls": "softmax_before_last",
}

# seed model_cls values: the original's OmniKV model, and its dense models (mapped to omnikv.enabled = false)
OMNIKV_MODELS = ("multi", "qwen_multi")
DENSE_MODEL_MARKS = ("raw", "262")
OTHER_MODELS = {
    "token": "selects at every layer from decoder_start_layer_idx on",
    "token_once": "selects once, at decoder_start_layer_idx, for every later layer",
    "once_offload": "selects once and offloads from offload_sid on",
    "brutal_offload": "streams whole layers from the host without selecting",
    "h2o": "the H2O baseline (every layer compressed; selector 'h2o' here is a different implementation)",
    "quest": "the Quest baseline (not implemented in the seed either)",
    "infllm": "the InfLLM baseline (selector 'infllm' here is a different implementation)",
}
# seed cache_cls values of the OmniKV model (same selections and results), and the others
OMNIKV_CACHES = ("multi", "without_pack")
OTHER_CACHES = {
    "default": "the select-once cache: one selection shared by every layer from offload_sid on",
    "lazy": "the select-once cache that keeps a selection while it overlaps the new one by more than skip_threshold",
    "eff": "the select-once cache with a shared host buffer",
}

SECTION_NAMES = frozenset({"model", "omnikv", "offload", "prefill", "generation", "profiling"})
_LAYER = re.compile(r"[0-9]{1,6}")
_BOOL = TypeAdapter(bool)


def _bool(key: str, value: Any) -> bool:
    try:
        return _BOOL.validate_python(value)
    except (ValidationError, RecursionError):
        raise ConfigError(key, value, "true or false") from None


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, value, "an integer")
    return value


def _number(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, value, "a finite number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, value, "a finite number")
    return value


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, value, "a string")
    return value


def _any(key: str, value: Any) -> Any:
    return value


def _optional_str(key: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigError(key, value, "a string or null")
    return value


def _segment_size(key: str, value: Any) -> int | str:
    if value in ("auto", "auto_70B"):
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, value, "an integer, 'auto' or 'auto_70B'")
    return value


def _fraction(key: str, value: Any) -> float:
    number = _number(key, value)
    if not 0 <= number <= 1:
        raise ConfigError(key, value, "a fraction of the prompt from 0 to 1")
    return number


# seed key -> (check of its value, why it has no effect here)
NO_EFFECT: dict[str, tuple[Callable[[str, Any], Any], str]] = {
    "decoder_start_layer_idx": (_int, "where the seed's select-once models select; OmniKV selects at filter layers"),
    "offload_sid": (_int, "the seed's select-once caches offload from there; here the sparse layers are"),
    "sparse_in_prefill": (_bool, "the seed's OmniKV model reads it but never uses it; its prefill is dense, as here"),
    "skip_prefill": (_bool, "an option of the seed's H2O baseline"),
    "skip_threshold": (_number, "an option of the seed's 'lazy' cache"),
    "seg_size": (_segment_size, "the prefill chunk size of the seed's H2O baseline (an integer, 'auto' or 'auto_70B')"),
    "attn_seg_sz": (_int, "the seed's OmniKV model reads it but never uses it"),
    "max_len_can_hold": (_int, "the seed's OmniKV model reads it but never uses it"),
    "ensure_head_tail_len": (_number, "read only by the seed's 'token' model"),
    "ntk_factor": (_number, "read only by the seed's 'token' model"),
    "num_sink_tokens": (_number, "sizes the seed's sink cache, which is off (use_sink_cache is not true)"),
    "sink_window_length": (_number, "sizes the seed's sink cache, which is off (use_sink_cache is not true)"),
    "infllm_cfg_path": (_optional_str, "configures the seed's InfLLM baseline"),
    "batch_size": (_int, "written by the seed's latency script; its generation runs one prompt at a time"),
    "use_multi_gpus": (
        _bool,
        "the seed's dense model spreads its weights over the GPUs with it (device_map='auto'), which does not "
        "change results; here distributed.tp_size or distributed.offload_weights place the weights",
    ),
    "n_gpu": (_int, "read only by the seed's H2O baseline"),
    "seed": (
        _int,
        "the random seed of the seed's H2O baseline (its OmniKV model always seeds 42 and decodes greedily)",
    ),
    "skip_gate": (_any, "not read by the seed's OmniKV model"),
    "chunk_size_for_prefill": (_any, "not read by the seed's OmniKV model"),
}


def _dense_more(key: str, value: Any, data: dict[str, Any]) -> str:
    if not _bool(key, value):
        raise ConfigError(key, value, "true: the original raises for false (its OmniKV model runs only dense_more)")
    return "layers before the first filter layer, filter and wait layers always keep full KV and run dense here"


def _fixed_prompt(key: str, value: Any, data: dict[str, Any]) -> str:
    if not _bool(key, value):
        raise ConfigError(key, value, "true: the original asserts it (it has no other prompt mode)")
    return "the original's only prompt mode"


def _sinks(key: str, value: Any, data: dict[str, Any]) -> str:
    if _bool(key, value):
        raise ConfigError(
            key,
            value,
            "false: it turns on the seed's attention-sink cache (StreamingLLM), and this runtime adds no "
            "sinks; for that baseline write a sectioned config with selector 'streaming_llm'",
        )
    return "the seed's sink cache is off"


def _rope_factor(key: str, value: Any, data: dict[str, Any]) -> str:
    if _number(key, value) > 0:
        raise ConfigError(
            key,
            value,
            "0 or less: a positive factor sets dynamic RoPE scaling on the model in the seed; this "
            "runtime uses the checkpoint's rope_scaling (set it in the model's config.json)",
        )
    return "RoPE scaling stays the checkpoint's"


def _pretraining_tp(key: str, value: Any, data: dict[str, Any]) -> str:
    if _int(key, value) > 1:
        raise ConfigError(key, value, "1: the seed's selection raises NotImplementedError for more")
    return "a single slice, as here"


def _gptq(key: str, value: Any, data: dict[str, Any]) -> str:
    if _bool(key, value) and data.get("load_in_4bit") is True:
        raise ConfigError(key, value, "false: the seed raises NotImplementedError for GPTQ with load_in_4bit")
    return "GPTQ applies only with load_in_4bit in the seed"


def _dense_model(value: Any) -> bool:
    """True for a seed model_cls that names the original's dense model."""
    return isinstance(value, str) and any(mark in value for mark in DENSE_MODEL_MARKS)


def _model_cls(key: str, value: Any, data: dict[str, Any]) -> str:
    name = _str(key, value)
    if name in OMNIKV_MODELS:
        return "it is the seed's OmniKV model, which this runtime implements (the family comes from the checkpoint)"
    baseline = next((cls for cls in ("h2o", "quest", "infllm") if cls in name), name)  # the seed matches these by part
    kind = OTHER_MODELS.get(baseline, "not a model class the seed defines")
    allowed = f"{OMNIKV_MODELS} (OmniKV) or a name with {DENSE_MODEL_MARKS} (dense)"
    raise ConfigError(key, value, f"{allowed}; '{name}': {kind}, which this runtime does not run")


def _cache_cls(key: str, value: Any, data: dict[str, Any]) -> str:
    name = _str(key, value)
    if _dense_model(data.get("model_cls")):
        return "the seed's dense model does not use it"
    if name in OMNIKV_CACHES:
        return "it is the seed's cache of the OmniKV model; the tiers and transfers here are this runtime's own"
    why = OTHER_CACHES.get(name, f"not a cache the seed defines{did_you_mean(name, [*OMNIKV_CACHES, *OTHER_CACHES])}")
    raise ConfigError(key, value, f"one of {OMNIKV_CACHES} (OmniKV's caches); '{name}' is {why}")


# seed key -> handler: returns why the value has no effect here, or raises ConfigError to refuse it
CONDITIONAL: dict[str, Callable[[str, Any, dict[str, Any]], str]] = {
    "dense_more": _dense_more,
    "use_fixed_prompt": _fixed_prompt,
    "use_sink_cache": _sinks,
    "use_sink": _sinks,
    "rope_factor": _rope_factor,
    "pretraining_tp": _pretraining_tp,
    "use_gptq": _gptq,
    "model_cls": _model_cls,
    "cache_cls": _cache_cls,
}
# the seed's H2O baseline budget: hh_ratio of the prompt as heavy hitters plus recent_ratio as the latest tokens
H2O_RATIOS = ("hh_ratio", "recent_ratio")
SEED_KEYS = frozenset(MAPPED) | frozenset(NO_EFFECT) | frozenset(CONDITIONAL) | frozenset(H2O_RATIOS)


def is_legacy(data: dict[str, Any]) -> bool:
    """True when `data` has a key of the seed OmniKV's flat format at its top level."""
    return any(isinstance(key, str) and key in SEED_KEYS for key in data)


def _parse_layers(value: Any) -> list[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    parts = [part.strip() for part in value.split(",")] if isinstance(value, str) else None
    if parts is None or not all(_LAYER.fullmatch(part) for part in parts if part):
        raise ConfigError("do_select_layers", value, 'comma-separated layer indices such as "2,8,18"')
    return [int(part) for part in parts if part]


def _map(key: str, value: Any, out: dict[str, dict[str, Any]], selector: dict[str, Any]) -> None:
    from omnikv_runtime.policies.registry import SELECTION_ALIASES

    section, field = MAPPED[key]
    if key == "do_select_layers":
        out[section][field] = _parse_layers(value)
    elif key == "use_flash_attn":
        out[section][field] = "flash_attention_2" if _bool(key, value) else "sdpa"
    elif key in ("load_in_8bit", "load_in_4bit"):
        if _bool(key, value):
            if not bitsandbytes_installed():
                raise ConfigError(key, True, f"{BITSANDBYTES_MISSING}; or false")
            out[section][field] = "8bit" if key == "load_in_8bit" else "4bit"
    elif key == "real_offload":
        out[section][field] = "cpu" if _bool(key, value) else "none"
    elif key in ("use_chat_template", "cot"):
        out[section][field] = _bool(key, value)
    elif key == "selector_cls":
        name = _str(key, value)
        if name in SELECTION_ALIASES:
            logger.info("seed selector_cls %r is called %r here", name, SELECTION_ALIASES[name])
        selector["type"] = SELECTION_ALIASES.get(name, name)
    elif key == "window_size":
        selector["window_size"] = value
    else:
        out[section][field] = value


def _drop_unused_window(selector: dict[str, Any]) -> None:
    """The seed's ``window_size`` serves only its window selectors: with a registered selector that has
    no window it has no effect here (one log line); its value is still checked."""
    from omnikv_runtime.policies.params import check_value, parameters
    from omnikv_runtime.policies.registry import SELECTION_ALIASES, SELECTION_POLICIES

    if "window_size" not in selector or not isinstance(selector.get("type"), str):
        return
    cls = SELECTION_POLICIES.get(SELECTION_ALIASES.get(selector["type"], selector["type"]))
    if cls is None or "window_size" in parameters(cls):
        return  # a window selector, or a class the policy check resolves later
    value = selector.pop("window_size")
    check_value("window_size", value, int, (1, MAX_WINDOW))
    logger.info(
        "seed config key 'window_size' = %r has no effect here: selector %r reads only the current query",
        value,
        selector["type"],
    )


def _merge(out: dict[str, dict[str, Any]], sections: dict[str, Any]) -> None:
    """Add the sections written in a seed config to what its seed keys map to; a field set twice is refused."""
    for name, given in sections.items():
        if not isinstance(given, dict):
            if out[name]:
                raise ConfigError(name, given, "a section (a JSON object)")
            out[name] = given  # validation names the bad value
            continue
        for field, value in given.items():
            if field in out[name]:
                seed = [key for key, (section, target) in MAPPED.items() if (section, target) == (name, field)]
                raise ConfigError(f"{name}.{field}", value, f"one setting: the seed key(s) {seed} set it too")
            out[name][field] = value


def _h2o_ratios(flat: dict[str, Any], out: dict[str, dict[str, Any]], selector: dict[str, Any], written: set) -> None:
    """``hh_ratio`` and ``recent_ratio``: the seed's H2O baseline keeps ``int(hh_ratio * L)`` heavy hitters and
    ``int(recent_ratio * L)`` recent tokens of an ``L``-token prompt. With selector ``h2o`` they set this
    runtime's H2O policy: ``omnikv.token_budget = hh_ratio + recent_ratio`` and its ``recent_ratio`` the recent
    share of that (the budget may round to one token more than the seed's two roundings). With another
    selector nothing reads them (one log line)."""
    given = {key: _fraction(key, flat[key]) for key in H2O_RATIOS if key in flat}
    if not given:
        return
    if selector.get("type") != "h2o":
        for key in given:
            logger.info(
                "seed config key %r has no effect here: the seed's H2O baseline reads it, and the selector is %r",
                key,
                selector.get("type"),
            )
        return
    missing = [key for key in H2O_RATIOS if key not in given]
    if missing:
        key = next(iter(given))
        raise ConfigError(key, given[key], f"given with {missing[0]} too: the seed's H2O budget needs both")
    if "num_of_selected_tokens" in flat or ("omnikv", "token_budget") in written:
        raise ConfigError(
            "hh_ratio",
            given["hh_ratio"],
            "left out with selector 'h2o' when num_of_selected_tokens or omnikv.token_budget sets the budget: "
            "hh_ratio + recent_ratio set it too",
        )
    total = given["hh_ratio"] + given["recent_ratio"]
    if not 0 < total <= 1:
        raise ConfigError("hh_ratio", given["hh_ratio"], f"a value with recent_ratio summing to (0, 1], got {total:g}")
    out["omnikv"]["token_budget"] = float(total)
    selector["recent_ratio"] = given["recent_ratio"] / total
    logger.info(
        "seed H2O ratios hh_ratio = %r, recent_ratio = %r set selector 'h2o': omnikv.token_budget = %r, its "
        "recent_ratio = %r (this runtime's H2O policy, which selects at the filter layers; the seed's H2O baseline "
        "compresses every layer)",
        given["hh_ratio"],
        given["recent_ratio"],
        total,
        selector["recent_ratio"],
    )


def from_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """Translate a seed OmniKV flat config into the sectioned layout (a dict to validate)."""
    out: dict[str, dict[str, Any]] = {name: {} for name in sorted(SECTION_NAMES)}
    selector: dict[str, Any] = {}
    flat = {key: value for key, value in data.items() if key not in SECTION_NAMES}
    for key, value in flat.items():
        if key in MAPPED:
            _map(key, value, out, selector)
        elif key in NO_EFFECT:
            check, reason = NO_EFFECT[key]
            check(key, value)
            logger.info("seed config key %r has no effect here: %s", key, reason)
        elif key == "model_cls" and _dense_model(value):
            out["omnikv"]["enabled"] = False
            logger.info("seed model_cls %r is the original's dense model: omnikv.enabled = false", value)
        elif key in CONDITIONAL:
            reason = CONDITIONAL[key](key, value, flat)
            logger.info("seed config key %r = %r has no effect here: %s", key, value, reason)
        elif key in H2O_RATIOS:
            continue  # read with the selector below
        else:
            known = sorted(SEED_KEYS | SECTION_NAMES)
            raise ConfigError(str(key), value, f"a seed OmniKV key{did_you_mean(str(key), known)}; known: {known}")
    written = {(name, field) for name in SECTION_NAMES if isinstance(data.get(name), dict) for field in data[name]}
    defaults = {key: value for key, value in SEED_DEFAULTS.items() if key not in flat and MAPPED[key] not in written}
    for key, value in defaults.items():
        _map(key, value, out, selector)
    if defaults:
        logger.info("seed config: keys left out take the original's defaults: %s", defaults)
    _h2o_ratios(flat, out, selector, written)
    _drop_unused_window(selector)
    if selector:
        out["omnikv"]["selector"] = selector
    _merge(out, {name: data[name] for name in SECTION_NAMES if name in data})
    if isinstance(out["omnikv"], dict):  # the original has no budget floor; a section may still ask for one
        out["omnikv"].setdefault("min_token_budget", 0)
    return {name: section for name, section in out.items() if section or name in data}


def seed_key_of(field: str) -> str | None:
    """The seed key that maps onto sectioned `field` (a dotted path, maybe deeper), if one does."""
    for key, (section, target) in MAPPED.items():
        path = f"{section}.{target}"
        if field == path or field.startswith((f"{path}.", f"{path}[")):
            if target == "selector":
                return "window_size" if field.endswith("window_size") else "selector_cls"
            return key
    return None

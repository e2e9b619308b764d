"""The seed OmniKV's flat JSON config, mapped onto :class:`~omnikv_runtime.config.OmniKVConfig`.

Seed configs look like ``{"model_name": ..., "do_select_layers": "2,8,18",
"num_of_selected_tokens": 0.067, "real_offload": true, ...}``. Each key maps to one field of the
sectioned config; unknown keys raise a ConfigError with a did-you-mean.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from omnikv_runtime.errors import ConfigError, did_you_mean

logger = logging.getLogger(__name__)

# seed key -> (section, field); values that need converting are handled in from_legacy
LEGACY_KEYS: dict[str, tuple[str, str]] = {
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
    "dense_more": ("omnikv", "-"),
    "real_offload": ("offload", "device"),
    "use_chat_template": ("generation", "use_chat_template"),
    "cot": ("generation", "cot"),
}
# keys the seed's scripts carried that say nothing about the runtime; accepted and ignored
IGNORED_KEYS = frozenset({"model_cls", "offload_sid", "skip_gate", "chunk_size_for_prefill"})
SECTION_NAMES = frozenset({"model", "omnikv", "offload", "prefill", "generation"})


def is_legacy(data: dict[str, Any]) -> bool:
    """True when `data` looks like a seed OmniKV config rather than a sectioned one."""
    return bool(data) and not (set(data) & SECTION_NAMES) and bool(set(data) & set(LEGACY_KEYS))


def _parse_layers(value: Any) -> list[int]:
    if isinstance(value, list):
        return value
    if isinstance(value, int):
        return [value]
    try:
        return [int(part) for part in str(value).replace(" ", "").split(",") if part]
    except ValueError:
        raise ConfigError("do_select_layers", value, 'comma-separated layer indices such as "2,8,18"') from None


def _check_bitsandbytes(key: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(key, True, "8-bit/4-bit loading needs bitsandbytes: `pip install bitsandbytes` (CUDA only)")


def from_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """Translate a seed OmniKV flat config into the sectioned layout (a dict to validate)."""
    out: dict[str, dict[str, Any]] = {name: {} for name in sorted(SECTION_NAMES)}
    selector: dict[str, Any] = {}
    for key, value in data.items():
        if key in IGNORED_KEYS:
            logger.info("seed config key %r has no meaning in this runtime; ignored", key)
            continue
        if key not in LEGACY_KEYS:
            known = sorted(LEGACY_KEYS)
            raise ConfigError(key, value, f"a seed OmniKV key{did_you_mean(key, known)}; known: {known}")
        section, field = LEGACY_KEYS[key]
        if key == "do_select_layers":
            out[section][field] = _parse_layers(value)
        elif key == "use_flash_attn":
            out[section][field] = "flash_attention_2" if value else "sdpa"
        elif key in ("load_in_8bit", "load_in_4bit"):
            if value:
                _check_bitsandbytes(key)
                out[section][field] = "8bit" if key == "load_in_8bit" else "4bit"
        elif key == "real_offload":
            out[section][field] = "cpu" if value else "none"
        elif key == "selector_cls":
            selector["type"] = value
        elif key == "window_size":
            selector["window_size"] = value
        elif key == "dense_more":
            logger.info(
                "seed key 'dense_more' has no effect: layers before the first filter layer, the filter "
                "layers and their wait layers always keep full KV and run full attention here"
            )
        else:
            out[section][field] = value
    if selector:
        out["omnikv"]["selector"] = selector
    return {name: section for name, section in out.items() if section}

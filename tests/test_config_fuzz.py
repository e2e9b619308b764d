"""Fuzzed configs: thousands of mutated configs (types, ranges, nesting, encodings, seed keys) give a
loaded config or a ConfigError, never another exception, and never run code they name.

Seeded, so a failure reproduces; the case that failed is in the message.
"""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path
from typing import Any

import omnikv_runtime as okv
from omnikv_runtime.config.legacy import SEED_KEYS

ROOT = Path(__file__).resolve().parents[1]
BASES: list[dict[str, Any]] = [
    json.loads(p.read_text(encoding="utf-8")) for p in sorted((ROOT / "configs").glob("*.json"))
]
BASES.append(
    {
        "omnikv": {
            "filter_layers": [2, 6, 18],
            "wait_layers": 1,
            "token_budget": 256,
            "min_token_budget": 8,
            "tail_tokens": 32,
            "selector": {"type": "h2o", "window_size": 64, "recent_ratio": 0.5},
        },
        "offload": {"device": "cpu", "hot_cache_tokens": 512, "eviction": {"type": "lfu"}},
        "prefill": {"chunk_size": 1024},
        "generation": {"max_new_tokens": 16, "check_every": 4, "cuda_graphs": False},
        "profiling": {"interval_ms": 5, "trace": False, "png": False},
    }
)
BASES.append({"do_select_layers": "2,3", "selector_cls": "uniform", "window_size": 8, "profiling": {"png": False}})

SELECTORS = ["last", "softmax_last", "softmax_before_last", "uniform", "exp", "full", "streaming_llm", "h2o"]
SELECTORS += ["snapkv", "quest", "infllm", "this:X", "antigravity:Y", "os:system", "a:b:c", ":", "lastt"]
NAMES = ["window_size", "page_size", "decay", "block_size", "kernel_size", "sink_tokens", "recent_ratio", "type"]
NAMES += ["device", "eviction", "selector", "filter_layers", "token_budget", "interval_ms", "enabled", "x" * 300]
ODD: list[Any] = [
    0, -1, 1, 2, 3, 16, 1023, 4096, 4097, 2**24, 2**24 + 1, 2**31, 10**12, 10**30, -(10**30), 10**400,
    0.0, -0.0, 0.5, 1.0, 1.5, 0.067, 1e-300, 1e300, float("inf"), float("-inf"), float("nan"),
    True, False, None, "", "0", "1", "true", "false", "yes", "maybe", "2,3", "8,2", "2,,8", "\u0663",
    "cpu", "none", "cuda:0", "cuda:x", "auto", "sdpa", "bfloat16", "lru", "lfu", "multi", "raw", "lazy",
    "x" * 5000, "\x00", "\ud800", "caf\u00e9 \u2603", [], [1], [2, 1], [-1], [[2]], ["2"], {}, {"type": "last"},
    {"a": {"b": {"c": 1}}}, *SELECTORS,
]  # fmt: skip


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in `node` a mutation may edit, down to depth 6 (deep nesting is a value, not a shape)."""
    found = [prefix]
    if len(prefix) >= 6:
        return found
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def _set(root: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    return root


def _deep(rng: random.Random, leaf: Any) -> Any:
    for _ in range(rng.choice([2, 10, 200, 3000])):
        leaf = [leaf] if rng.random() < 0.5 else {"k": leaf}
    return leaf


def _value(rng: random.Random) -> Any:
    pick = rng.random()
    if pick < 0.7:
        return copy.deepcopy(rng.choice(ODD))
    if pick < 0.8:
        return rng.randint(-(2**40), 2**40)
    if pick < 0.9:
        return rng.uniform(-10, 10) * 10 ** rng.randint(-5, 12)
    return _deep(rng, rng.choice(ODD))


def mutate(rng: random.Random, config: dict[str, Any]) -> Any:
    """One to three random edits of a copy of `config`."""
    config = copy.deepcopy(config)
    for _ in range(rng.randint(1, 3)):
        paths = _paths(config)
        path = rng.choice(paths)
        op = rng.random()
        if op < 0.45:  # replace a value (or the whole config)
            config = _set(config, path, _value(rng))
        elif op < 0.55 and path:  # delete a key or an item
            parent = config
            for key in path[:-1]:
                parent = parent[key]
            del parent[path[-1]]
        elif op < 0.75:  # add a key somewhere: a seed key, a field or section name, or junk
            target = config
            for key in path:
                target = target[key]
            if isinstance(target, dict):
                keys = [*sorted(SEED_KEYS), *NAMES, "model", "omnikv", "profiling", "omnikv ", "Omnikv", 1, None]
                key = rng.choice(keys)  # (JSON turns 1 and None into strings; a dict keeps them)
                target[key] = _value(rng)
        elif op < 0.85:  # wrap a value in a list, an object, or deep nesting
            config = _set(config, path, rng.choice([[_get(config, path)], {"v": _get(config, path)}]))
            if rng.random() < 0.2:
                config = _set(config, path, _deep(rng, _get(config, path)))
        else:  # change a value's type
            value = _get(config, path)
            converted = [_text(value), not value, [value]]
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                converted += [float(value) if abs(value) < 1e300 else value, -value, value * 10**9]
            config = _set(config, path, rng.choice(converted))
        if not isinstance(config, dict):
            break
    return config


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value.upper()
    try:
        return str(value)
    except (RecursionError, ValueError):  # deep nesting, an int past the digit limit
        return "<deep>"


def _get(root: Any, path: tuple) -> Any:
    for key in path:
        root = root[key]
    return root


def encode(rng: random.Random, config: Any) -> bytes:
    """`config` as file bytes, in a random encoding, sometimes damaged."""
    try:
        text = json.dumps(config, ensure_ascii=rng.random() < 0.5)
    except (ValueError, RecursionError):
        text = '{"omnikv": ' + "[" * 5000 + "]" * 5000 + "}"
    if rng.random() < 0.1:
        text = text.replace("16", "1" + "6" * 5000, 1)
    encoding = rng.choice(["utf-8", "utf-8", "utf-8", "utf-8-sig", "utf-16", "utf-32", "latin-1", "cp1252"])
    try:
        data = text.encode(encoding)
    except UnicodeEncodeError:
        data = text.encode("utf-8", errors="surrogatepass")
    damage = rng.random()
    if damage < 0.1 and data:
        cut = rng.randrange(len(data))
        data = data[:cut]
    elif damage < 0.2 and data:
        spot = rng.randrange(len(data))
        data = data[:spot] + bytes([rng.randrange(256)]) + data[spot + 1 :]
    elif damage < 0.25:
        data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
    return data


def test_fuzzed_configs_give_a_config_or_a_config_error(tmp_path, capsys):
    rng = random.Random(20251130)
    imported_before = {name for name in ("this", "antigravity") if name in sys.modules}
    path = tmp_path / "fuzz.json"
    outcomes = {"loaded": 0, "refused": 0}
    failures = []
    for case in range(2400):
        config = mutate(rng, rng.choice(BASES))
        from_file = case % 3 == 0
        if from_file:
            path.write_bytes(encode(rng, config))
        try:
            okv.load_config(path if from_file else config)
            outcomes["loaded"] += 1
        except okv.ConfigError as error:
            outcomes["refused"] += 1
            if from_file and str(path) not in str(error):
                failures.append((case, "the error does not name the file", str(error)[:300]))
        except Exception as error:  # noqa: BLE001 - any other exception is what this test looks for
            failures.append((case, type(error).__name__, str(error)[:300], repr(config)[:300]))
    assert not failures, failures[:5]
    assert sum(outcomes.values()) >= 2000
    assert outcomes["loaded"] >= 200 and outcomes["refused"] >= 1000, outcomes  # both paths are exercised
    assert capsys.readouterr().out == ""  # no module named in a config ran (the Zen of Python prints)
    assert {name for name in ("this", "antigravity") if name in sys.modules} == imported_before

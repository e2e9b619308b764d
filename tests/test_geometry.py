"""A model's geometry (layers, heads, KV heads, head_dim, hidden size) is derived in one place.

:class:`omnikv_runtime.geometry.ModelGeometry` reads it from a transformers config (with the
fallbacks: KV heads default to the attention heads, head_dim to hidden size / heads); every other
module asks it. The scan below fails when a module reads those fields off a config by hand again.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from okv_testlib import FAMILIES, make_model

from omnikv_runtime import geometry as geometry_module
from omnikv_runtime.geometry import ModelGeometry

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("omnikv_runtime", "policies", "transfer", "benchmarks")
HOME = Path("omnikv_runtime/geometry.py")
# names only a transformers config (or a transformers module) carries: none of ours reads them
CONFIG_ONLY = {"num_hidden_layers", "num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size"}
# ``head_dim`` is also ModelGeometry's own field and an attention module's: a read counts only off a config
ON_A_CONFIG = {"head_dim"}


def _config_names(tree: ast.AST) -> set[str]:
    """Names the module binds to a config: ``text = model.config.get_text_config(...)`` and the like (not
    ``geometry = ModelGeometry.from_hf_config(...)``)."""
    names = set()
    for node in ast.walk(tree):
        value = ast.unparse(node.value).lower() if isinstance(node, ast.Assign) else ""
        if "config" in value and "geometry" not in value:
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return names


def _is_config(node: ast.expr, config_names: set[str]) -> bool:
    return "config" in ast.unparse(node) or (isinstance(node, ast.Name) and node.id in config_names)


def hand_derivations(source: str) -> list[tuple[int, str]]:
    """(line, field) of each geometry field read off a config object in ``source``.

    Counted: ``x.num_key_value_heads`` (and the other config-only names) on anything, ``getattr(x, name, ...)``
    of any of them or of ``head_dim`` (the fallback pattern), and ``x.head_dim`` where ``x`` is a config. Not
    counted: dict literals and keys (a geometry written down), ``geometry.head_dim``, ``attention.head_dim``.
    """
    tree = ast.parse(source)
    config_names = _config_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            target, field, by_name = node.value, node.attr, False
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "hasattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
        ):
            target, field, by_name = node.args[0], node.args[1].value, True
        else:
            continue
        if field in CONFIG_ONLY or (field in ON_A_CONFIG and (by_name or _is_config(target, config_names))):
            found.append((node.lineno, field))
    return sorted(found)


def _scanned_files() -> list[Path]:
    return sorted(p.relative_to(ROOT) for folder in SCANNED for p in (ROOT / folder).rglob("*.py"))


def test_no_module_reads_the_geometry_off_a_config_by_hand():
    files = _scanned_files()
    assert len(files) > 100 and HOME in files  # the walk found the tree
    offenders = []
    for path in files:
        if path == HOME:
            continue
        for line, field in hand_derivations((ROOT / path).read_text(encoding="utf-8")):
            offenders.append(f"{path}:{line}: {field}")
    assert offenders == [], "derive these from omnikv_runtime.geometry.ModelGeometry (from_model / from_hf_config)"


@pytest.mark.parametrize(
    ("source", "fields"),
    [
        ("head_dim = getattr(text, 'head_dim', None) or text.hidden_size // text.num_attention_heads", 3),
        ("heads = config.num_key_value_heads", 1),
        ("layers = model.config.get_text_config(decoder=True).num_hidden_layers", 1),
        ("dim = model.config.head_dim", 1),
        ("text = model.config.get_text_config(decoder=True)\ndim = text.head_dim", 1),
        ("wide = getattr(cfg, 'intermediate_size')", 1),
        ("def f(text):\n    return text.hidden_size // 4", 1),
        ("dim = geometry.head_dim + attention.head_dim", 0),
        ("spec = {'num_hidden_layers': 8, 'head_dim': 16}", 0),
        ("row = 2 * geometry.kv_heads * geometry.head_dim", 0),
    ],
)
def test_the_scan_tells_a_hand_derivation_from_a_geometry_read(source, fields):
    assert len(hand_derivations(source)) == fields


def test_the_geometry_module_imports_nothing_heavy():
    code = (
        "import sys, omnikv_runtime.geometry\n"
        "print(sorted(m for m in ('torch', 'transformers', 'pydantic') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == "[]"


def test_the_planner_hands_out_the_same_class():
    from omnikv_runtime.planner import ModelGeometry as FromPlanner

    assert FromPlanner is geometry_module.ModelGeometry


@pytest.mark.parametrize("family", FAMILIES)
def test_from_model_reads_the_decoder_config(family):
    model = make_model(family)
    text = model.config.get_text_config(decoder=True)
    geometry = ModelGeometry.from_model(model)
    assert geometry == ModelGeometry.from_hf_config(model.config)
    assert (geometry.num_layers, geometry.num_heads, geometry.hidden) == (
        text.num_hidden_layers,
        text.num_attention_heads,
        text.hidden_size,
    )
    # the KV heads and head_dim the model's attention really uses
    attention = model.model.layers[0].self_attn
    assert geometry.head_dim == attention.head_dim == attention.k_proj.out_features // geometry.kv_heads


def test_fallbacks_when_a_config_omits_kv_heads_and_head_dim():
    spec = {
        "num_hidden_layers": 2,
        "num_attention_heads": 6,
        "hidden_size": 48,
        "intermediate_size": 96,
        "vocab_size": 100,
    }
    geometry = ModelGeometry.from_hf_config(spec)
    assert (geometry.kv_heads, geometry.head_dim) == (6, 8)  # multi-head attention, hidden / heads
    wrapped = ModelGeometry.from_hf_config({"model_type": "llava", "text_config": {**spec, "head_dim": 32}})
    assert (wrapped.kv_heads, wrapped.head_dim) == (6, 32)  # a multimodal config's language model

"""Policies as declared dataclasses: every bad selector spec is a ConfigError naming the field, no policy
accepts an argument it ignores, and registration checks the class."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import user_policy_example

import omnikv_runtime as okv
from omnikv_runtime.policies import (
    SELECTION_POLICIES,
    ScoredPolicy,
    SelectionContext,
    SelectionPolicy,
    make_eviction_policy,
    make_selection_policy,
    register_selection_policy,
)
from omnikv_runtime.policies.params import parameters

BUILTIN = ("last", "softmax_last", "uniform", "exp", "full", "streaming_llm", "h2o", "snapkv", "quest", "infllm")


# bad specs (one table: unknown names, user classes, unknown arguments, types, bounds, cross-field checks) ----


@pytest.mark.parametrize(
    ("selector", "field", "allowed"),
    [
        ("lastt", "omnikv.selector.type", "did you mean 'last'"),
        ({"type": "uniformm"}, "omnikv.selector.type", "did you mean 'uniform'"),
        ({"type": "h2oo"}, "omnikv.selector.type", "did you mean 'h2o'"),
        ({"type": "exq"}, "omnikv.selector.type", "softmax_last"),
        ({"type": "user_policy_example:"}, "omnikv.selector.type", "both parts given"),
        ({"type": ":RecentBoostPolicy"}, "omnikv.selector.type", "both parts given"),
        ({"type": "user_policy_example:RecentBoostPolicy:extra"}, "omnikv.selector.type", "one ':'"),
        ({"type": "user_policy_example.nowhere:RecentBoostPolicy"}, "omnikv.selector.type", "importable module"),
        ({"type": "no_such_module_xyz:Policy"}, "omnikv.selector.type", "importable module"),
        ({"type": "user_policy_example:NoSuchClass"}, "omnikv.selector.type", "no 'NoSuchClass'"),
        ({"type": "user_policy_example:NotAPolicy"}, "omnikv.selector.type", "subclass of omnikv_runtime.policies"),
        ({"type": "user_policy_example:HollowPolicy"}, "omnikv.selector.type", "implements select(ctx)"),
        ({"type": "user_policy_example:HollowScoredPolicy"}, "omnikv.selector.type", "implements scores(ctx)"),
        ({"type": "user_policy_example:HollowLossyPolicy"}, "omnikv.selector.type", "implements rank(ctx, state)"),
        ({"type": "user_policy_example:KeywordsPolicy"}, "omnikv.selector.type", "declares its parameters"),
        ({"type": "last", "window_size": 16}, "omnikv.selector.window_size", "'last' takes no parameters"),
        ({"type": "full", "window_size": 4}, "omnikv.selector.window_size", "'full' takes no parameters"),
        ({"type": "quest", "window_size": 4}, "omnikv.selector.window_size", "takes only ['page_size']"),
        ({"type": "last", "bogus": 1}, "omnikv.selector.bogus", "no such argument"),
        ({"type": "quest", "page_sise": 8}, "omnikv.selector.page_sise", "did you mean 'page_size'"),
        ({"type": "quest", "page_size": 0}, "omnikv.selector.page_size", "from 1 to 4096"),
        ({"type": "quest", "page_size": 1.5}, "omnikv.selector.page_size", "an integer"),
        ({"type": "quest", "page_size": "16"}, "omnikv.selector.page_size", "an integer"),
        ({"type": "quest", "page_size": True}, "omnikv.selector.page_size", "an integer"),
        ({"type": "h2o", "recent_ratio": "0.5"}, "omnikv.selector.recent_ratio", "a number"),
        ({"type": "h2o", "recent_ratio": 1.5}, "omnikv.selector.recent_ratio", "from 0.0 to 1.0"),
        ({"type": "exp", "decay": 2.0}, "omnikv.selector.decay", "from 0.0 to 1.0"),
        ({"type": "exp", "decay": float("nan")}, "omnikv.selector.decay", "finite"),
        ({"type": "exp", "decay": 0.0}, "omnikv.selector", "decay must lie in (0, 1]"),
        ({"type": "infllm", "init_tokens": -1}, "omnikv.selector.init_tokens", "from 0"),
        ({"type": "infllm", "representatives": 20}, "omnikv.selector", "representatives must be at most block_size"),
        ({"type": "snapkv", "kernel_size": 4}, "omnikv.selector", "positive odd number"),
        ({"type": "streaming_llm", "sink_tokens": 2.0}, "omnikv.selector.sink_tokens", "an integer"),
        ({"type": "user_policy_example:RecentBoostPolicy", "recent": -1}, "omnikv.selector.recent", "from 0"),
        ({"type": "user_policy_example:RecentBoostPolicy", "window_size": 2}, "omnikv.selector.window_size", "recent"),
    ],
)
def test_bad_selector_specs_are_config_errors(selector, field, allowed):
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({"omnikv": {"selector": selector}}, trust_remote_code=True)
    error = excinfo.value
    assert error.field == field and allowed in str(error), str(error)
    assert f"'{field}'" in str(error)


def test_an_eviction_policy_takes_no_argument_it_would_ignore():
    with pytest.raises(okv.ConfigError) as excinfo:
        okv.load_config({"offload": {"eviction": {"type": "lru", "decay": 0.5}}})
    assert excinfo.value.field == "offload.eviction.decay" and "'lru' takes no parameters" in str(excinfo.value)
    assert repr(make_eviction_policy({"type": "lfu"})) == "LFUEviction()"


def test_a_policy_built_in_python_checks_its_fields():
    cls = SELECTION_POLICIES["quest"]
    with pytest.raises(okv.ConfigError, match=r"'QuestPolicy.page_size' = 0 .* from 1 to 4096"):
        cls(page_size=0)
    with pytest.raises(TypeError):
        SELECTION_POLICIES["last"](window_size=4)  # a dataclass without that field
    assert repr(SELECTION_POLICIES["exp"](decay=0.25)) == "ExpWindowPolicy(window_size=16, decay=0.25)"


# no policy accepts an argument it ignores --------------------------------------------------------------------

# every parameter of every built-in policy (and of the docs' example) with a value other than its default
OTHER_VALUES = {
    ("exp", "window_size"): 3,
    ("exp", "decay"): 1.0,
    ("uniform", "window_size"): 3,
    ("h2o", "window_size"): 3,
    ("h2o", "recent_ratio"): 0.0,
    ("snapkv", "window_size"): 3,
    ("snapkv", "kernel_size"): 1,
    ("streaming_llm", "sink_tokens"): 0,
    ("quest", "page_size"): 4,
    ("infllm", "block_size"): 8,
    ("infllm", "representatives"): 1,
    ("infllm", "init_tokens"): 0,
    ("infllm", "local_ratio"): 0.0,
    ("user_policy_example:RecentBoostPolicy", "recent"): 0,
}


def _policy_class(name: str) -> type:
    return user_policy_example.RecentBoostPolicy if ":" in name else SELECTION_POLICIES[name]


def test_the_table_holds_every_parameter_of_every_policy():
    names = {*BUILTIN, "user_policy_example:RecentBoostPolicy"}
    declared = {(name, parameter) for name in names for parameter in parameters(_policy_class(name))}
    assert declared == set(OTHER_VALUES)
    # a policy without a window_size field reads the current query only
    assert {name for name in BUILTIN if "window_size" not in parameters(SELECTION_POLICIES[name])} == {
        "last",
        "softmax_last",
        "full",
        "streaming_llm",
        "quest",
        "infllm",
    }


def _decode_context(policy: SelectionPolicy, seed: int, length: int = 64, budget: int = 16) -> SelectionContext:
    """What the cache hands a filter layer at the first decode step: the policy's window of the most recent
    queries (the prompt's last ones, then the step's own at column `length`), the prompt's keys, a padded row."""
    g = torch.Generator().manual_seed(seed)
    everything = torch.randn(2, 4, length + 1, 16, generator=g)
    window = min(policy.window_size, length + 1)
    valid = torch.ones(2, length, dtype=torch.bool)
    valid[1, :5] = False
    return SelectionContext(
        queries=everything[:, :, -window:],
        query_positions=torch.arange(length + 1 - window, length + 1),
        keys=torch.randn(2, 2, length, 16, generator=g),
        valid=valid,
        token_budget=budget,
        scaling=0.25,
    )


@pytest.mark.parametrize(("name", "parameter"), sorted(OTHER_VALUES))
def test_every_parameter_changes_the_selection(name, parameter):
    spec = {"type": name}
    default = make_selection_policy(spec, trust_remote_code=True)
    changed = make_selection_policy({**spec, parameter: OTHER_VALUES[(name, parameter)]}, trust_remote_code=True)
    differs = False
    for seed in range(4):
        chosen = default.select(_decode_context(default, seed))
        differs |= not torch.equal(chosen, changed.select(_decode_context(changed, seed)))
    assert differs, f"{name}: {parameter} = {OTHER_VALUES[(name, parameter)]} selects what the default selects"


# registration ------------------------------------------------------------------------------------------------


def test_builtin_policies_register_themselves_by_name():
    assert set(BUILTIN) <= set(SELECTION_POLICIES)
    for name in BUILTIN:
        cls = SELECTION_POLICIES[name]
        assert issubclass(cls, SelectionPolicy) and cls.name == name


def test_registration_checks_the_class(monkeypatch):
    monkeypatch.setattr("omnikv_runtime.policies.registry.SELECTION_POLICIES", dict(SELECTION_POLICIES))
    with pytest.raises(TypeError, match="does not implement scores"):
        register_selection_policy(user_policy_example.HollowScoredPolicy)
    with pytest.raises(TypeError, match="takes \\*options"):
        register_selection_policy(user_policy_example.KeywordsPolicy)
    with pytest.raises(TypeError, match="not a subclass"):
        register_selection_policy(user_policy_example.NotAPolicy)

    @dataclass
    class Nameless(ScoredPolicy):
        def scores(self, ctx: SelectionContext) -> torch.Tensor:
            return ctx.keys.sum(-1).amax(1)

    with pytest.raises(TypeError, match="own registered name"):
        register_selection_policy(Nameless)

    @register_selection_policy
    @dataclass
    class Named(Nameless):
        name = "named_for_the_test"

    assert make_selection_policy({"type": "named_for_the_test"}) == Named()

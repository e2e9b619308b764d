"""Selection policies (which tokens a sparse layer sees) and their registry.

Built-in names: ``last``, ``softmax_last``, ``uniform``, ``exp``, ``full``. A user's class loads
by ``"package.module:ClassName"``; it must subclass :class:`SelectionPolicy`.
"""

from __future__ import annotations

from omnikv_runtime.policies.base import SelectionContext, SelectionPolicy, all_indices, head_logits
from omnikv_runtime.policies.exp import ExpWindowPolicy
from omnikv_runtime.policies.full import FullContextPolicy
from omnikv_runtime.policies.last import LastQueryPolicy
from omnikv_runtime.policies.registry import (
    SELECTION_POLICIES,
    make_selection_policy,
    register_selection_policy,
    resolve_policy_class,
)
from omnikv_runtime.policies.softmax_last import SoftmaxLastPolicy
from omnikv_runtime.policies.uniform import UniformWindowPolicy

for _cls in (LastQueryPolicy, SoftmaxLastPolicy, UniformWindowPolicy, ExpWindowPolicy, FullContextPolicy):
    register_selection_policy(_cls)

__all__ = [
    "SELECTION_POLICIES",
    "ExpWindowPolicy",
    "FullContextPolicy",
    "LastQueryPolicy",
    "SelectionContext",
    "SelectionPolicy",
    "SoftmaxLastPolicy",
    "UniformWindowPolicy",
    "all_indices",
    "head_logits",
    "make_selection_policy",
    "register_selection_policy",
    "resolve_policy_class",
]

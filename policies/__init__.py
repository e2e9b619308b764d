"""Selection policies (which tokens a sparse layer sees) and their registry.

Selection (built in: ``last``, ``softmax_last``, ``uniform``, ``exp``, ``full``) and eviction of
the GPU hot cache (``lru``, ``lfu``, ``none``). A user's class loads by
``"package.module:ClassName"``; it must subclass :class:`SelectionPolicy` or :class:`EvictionPolicy`.
"""

from __future__ import annotations

from omnikv_runtime.policies.base import SelectionContext, SelectionPolicy, all_indices, head_logits
from omnikv_runtime.policies.eviction_base import EvictionPolicy
from omnikv_runtime.policies.exp import ExpWindowPolicy
from omnikv_runtime.policies.full import FullContextPolicy
from omnikv_runtime.policies.keep import NoEviction
from omnikv_runtime.policies.last import LastQueryPolicy
from omnikv_runtime.policies.lfu import LFUEviction
from omnikv_runtime.policies.lru import LRUEviction
from omnikv_runtime.policies.registry import (
    EVICTION_POLICIES,
    SELECTION_POLICIES,
    make_eviction_policy,
    make_selection_policy,
    register_eviction_policy,
    register_selection_policy,
    resolve_policy_class,
)
from omnikv_runtime.policies.softmax_last import SoftmaxLastPolicy
from omnikv_runtime.policies.uniform import UniformWindowPolicy

for _cls in (LastQueryPolicy, SoftmaxLastPolicy, UniformWindowPolicy, ExpWindowPolicy, FullContextPolicy):
    register_selection_policy(_cls)
for _eviction in (LRUEviction, LFUEviction, NoEviction):
    register_eviction_policy(_eviction)

__all__ = [
    "EVICTION_POLICIES",
    "SELECTION_POLICIES",
    "EvictionPolicy",
    "LFUEviction",
    "LRUEviction",
    "NoEviction",
    "ExpWindowPolicy",
    "FullContextPolicy",
    "LastQueryPolicy",
    "SelectionContext",
    "SelectionPolicy",
    "SoftmaxLastPolicy",
    "UniformWindowPolicy",
    "all_indices",
    "head_logits",
    "make_eviction_policy",
    "make_selection_policy",
    "register_eviction_policy",
    "register_selection_policy",
    "resolve_policy_class",
]

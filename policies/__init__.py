"""Selection policies (which tokens a sparse layer sees) and their registry.

Selection (built in: OmniKV's ``last``, ``softmax_last``, ``uniform``, ``exp``; the baselines ``full``,
``streaming_llm``, ``h2o``, ``snapkv``, ``quest``, ``infllm``; see docs/policies.md) and eviction of
the GPU hot cache (``lru``, ``lfu``, ``none``). Every policy is a dataclass whose fields are its
parameters, registered under its ``name`` by the ``@register_selection_policy`` /
``@register_eviction_policy`` class decorators. A user's class loads by
``"package.module:ClassName"`` when the caller opts in (``trust_remote_code=True``); it must subclass
:class:`SelectionPolicy` (or :class:`ScoredPolicy`, :class:`LossyPolicy`) or :class:`EvictionPolicy`.
"""

from __future__ import annotations

from omnikv_runtime.policies.base import (
    ScoredPolicy,
    SelectionContext,
    SelectionPolicy,
    all_indices,
    head_logits,
)
from omnikv_runtime.policies.eviction_base import EvictionPolicy
from omnikv_runtime.policies.exp import ExpWindowPolicy
from omnikv_runtime.policies.full import FullContextPolicy
from omnikv_runtime.policies.h2o import H2OPolicy
from omnikv_runtime.policies.infllm import InfLLMPolicy
from omnikv_runtime.policies.keep import NoEviction
from omnikv_runtime.policies.last import LastQueryPolicy
from omnikv_runtime.policies.lfu import LFUEviction
from omnikv_runtime.policies.lossy import LossyPolicy
from omnikv_runtime.policies.lru import LRUEviction
from omnikv_runtime.policies.params import bounded
from omnikv_runtime.policies.quest import QuestPolicy
from omnikv_runtime.policies.registry import (
    EVICTION_POLICIES,
    SELECTION_POLICIES,
    make_eviction_policy,
    make_selection_policy,
    register_eviction_policy,
    register_selection_policy,
    resolve_policy_class,
)
from omnikv_runtime.policies.snapkv import SnapKVPolicy
from omnikv_runtime.policies.softmax_last import SoftmaxLastPolicy
from omnikv_runtime.policies.streaming_llm import StreamingLLMPolicy
from omnikv_runtime.policies.uniform import UniformWindowPolicy

__all__ = [
    "EVICTION_POLICIES",
    "SELECTION_POLICIES",
    "EvictionPolicy",
    "LFUEviction",
    "LRUEviction",
    "NoEviction",
    "ExpWindowPolicy",
    "FullContextPolicy",
    "H2OPolicy",
    "InfLLMPolicy",
    "LossyPolicy",
    "QuestPolicy",
    "ScoredPolicy",
    "SnapKVPolicy",
    "StreamingLLMPolicy",
    "LastQueryPolicy",
    "SelectionContext",
    "SelectionPolicy",
    "SoftmaxLastPolicy",
    "UniformWindowPolicy",
    "all_indices",
    "bounded",
    "head_logits",
    "make_eviction_policy",
    "make_selection_policy",
    "register_eviction_policy",
    "register_selection_policy",
    "resolve_policy_class",
]

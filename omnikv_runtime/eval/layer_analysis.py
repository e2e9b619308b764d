"""Filter-layer analysis: which layers' token selections agree, and which filter layers to use.

For each prompt the dense model decodes a few answer tokens; at each of those steps (where the
runtime selects) every layer selects a top-k set as if it were a filter layer (the config's
selector and budget), and each layer's per-head attention of that step's query is kept. Matrices,
row = selecting layer l, column = served layer m, averaged over steps and prompts:

- ``iou``: overlap of l's and m's sets (the seed's raw measure);
- ``mass``: share of m's attention (mean over heads) on l's set; inflated by the attention sink,
  which every set holds and which takes most of the attention;
- ``recall``: share of m's own top-k, sink tokens excluded, in l's set; most of a top-k is filler
  with slightly higher logits, so this measures noise as much as need;
- ``attended``: of the attention that m's heads give to non-sink tokens they really look at (at
  least ``FOCUS`` of a head's attention), the share that falls on l's set: what sparse layer m
  would lose if l selected for it.

A filter-layer set is scored by what the runtime does with it: each sparse layer m is served by
the filter layer of its segment, so a plan's score is the mean ``attended[filter(m)][m]`` over its
sparse layers (the weakest layer is reported too). The suggestion fixes the first filter layer (how
much of the model stays dense is a speed choice) and searches the others exhaustively, or greedily
one at a time when there are too many combinations.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from omnikv_runtime.cache.attention import BASE_MASK_FUNCTIONS, attention_scaling, base_implementation, eager_attention
from omnikv_runtime.layout import LayerPlan
from omnikv_runtime.policies import SelectionContext, SelectionPolicy

logger = logging.getLogger(__name__)

PROBE = "omnikv_probe"
EXHAUSTIVE_LIMIT = 20000
FOCUS = 0.02  # a head "attends" a token that gets at least this share of its attention


@dataclass
class LayerProbe:
    """One prompt: per layer and answer step, the top-k set and the per-head attention of that step's query."""

    selections: list[torch.Tensor]  # per layer: sorted token indices [steps, k]
    attention: list[torch.Tensor]  # per layer: [steps, q_heads, context_len] softmax over the context
    sinks: torch.Tensor  # [context_len] bool, the sink tokens excluded from recall
    context_len: int


@contextmanager
def _probe_attention(model: PreTrainedModel, context_len: int) -> Iterator[dict[int, list]]:
    """Run `model` with an attention function that records, per layer, each decode step's query and
    the context's keys (the first `context_len` columns)."""
    records: dict[int, list] = {}
    previous = model.config._attn_implementation
    base_name = base_implementation(previous) or "sdpa"
    base = eager_attention if base_name == "eager" else ALL_ATTENTION_FUNCTIONS[base_name]

    def probe(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] == 1 and key.shape[2] > context_len:  # a decode step
            scaling = attention_scaling(module, query, kwargs)
            records.setdefault(module.layer_idx, []).append((query.detach(), key[:, :, :context_len], float(scaling)))
        return base(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(PROBE, probe)
    AttentionMaskInterface.register(PROBE, BASE_MASK_FUNCTIONS[base_name])
    model.set_attn_implementation(PROBE)
    try:
        yield records
    finally:
        model.set_attn_implementation(previous)


def probe_layers(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    policy: SelectionPolicy,
    budget: int,
    steps: int = 8,
    sink_tokens: int = 4,
    pad_token_id: int | None = None,
) -> LayerProbe:
    """Dense greedy decoding of `steps` tokens after one prompt; at every decode step (where the runtime
    selects), every layer selects `budget` context tokens with `policy` from that step's query.

    The query that matters is the one producing the answer, not the prompt's last one: on passkey
    prompts the needle is read while the digits are generated.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[0] != 1:
        raise ValueError(f"probe one prompt at a time, got a batch of {input_ids.shape[0]}")
    device = next(model.parameters()).device
    length = input_ids.shape[1]
    with _probe_attention(model, length) as records, torch.inference_mode():
        model.generate(
            input_ids=input_ids.to(device),
            attention_mask=torch.ones_like(input_ids).to(device),
            max_new_tokens=steps + 1,  # the first new token comes from the prefill; `steps` decode steps follow
            min_new_tokens=steps + 1,
            do_sample=False,
            pad_token_id=pad_token_id,
        )
    valid = torch.ones(1, length, dtype=torch.bool, device=device)
    selections, attention = [], []
    for layer in range(len(records)):
        layer_selections, layer_attention = [], []
        state: dict = {}  # the policy's per-request state for this layer
        for step, (query, keys, scaling) in enumerate(records[layer]):
            position = torch.tensor([length + step], device=device)
            ctx = SelectionContext(query, position, keys, valid, budget, scaling, layer=layer, state=state)
            layer_selections.append(policy.select(ctx)[0].cpu())
            group = query.shape[1] // keys.shape[1]
            logits = torch.einsum("hd,htd->ht", query[0, :, 0].float(), keys[0].float().repeat_interleave(group, 0))
            layer_attention.append(torch.softmax(logits * scaling, dim=-1).cpu())
        selections.append(torch.stack(layer_selections))
        attention.append(torch.stack(layer_attention))
    sinks = torch.zeros(length, dtype=torch.bool)
    sinks[:sink_tokens] = True
    return LayerProbe(selections, attention, sinks, length)


def _as_mask(indices: torch.Tensor, length: int) -> torch.Tensor:
    return torch.zeros(length, dtype=torch.bool).index_fill_(0, indices, True)


def layer_metrics(probe: LayerProbe) -> dict[str, torch.Tensor]:
    """``iou``, ``mass``, ``recall`` and ``attended`` as ``[layers, layers]`` tensors (row: selecting layer
    l, column: served layer m), each the mean over the answer steps."""
    steps = probe.selections[0].shape[0]
    per_step = []
    for step in range(steps):
        masks = torch.stack([_as_mask(s[step], probe.context_len) for s in probe.selections]).float()  # [L, T]
        intersection = masks @ masks.T
        sizes = masks.sum(-1)
        iou = intersection / (sizes[:, None] + sizes[None, :] - intersection).clamp(min=1.0)
        mean_attention = torch.stack([a[step].mean(0) for a in probe.attention])  # [L, T]
        mass = masks @ mean_attention.T  # [l, m]: layer m's attention on l's set
        targets = masks * ~probe.sinks  # each layer's own top-k without the sinks
        recall = (masks @ targets.T) / targets.sum(-1)[None, :].clamp(min=1.0)
        # attended: per head, the non-sink tokens holding at least FOCUS of its attention, mass-weighted
        strong = torch.stack([a[step] for a in probe.attention]) * ~probe.sinks  # [L, heads, T]
        strong = (strong * (strong >= FOCUS)).sum(1)  # [m, T]
        total = strong.sum(-1)
        attended = torch.where(total > 0, (masks @ strong.T) / total.clamp(min=1e-12), torch.ones_like(iou))
        per_step.append(torch.stack([iou, mass, recall, attended]))
    iou, mass, recall, attended = torch.stack(per_step).mean(0)
    return {"iou": iou, "mass": mass, "recall": recall, "attended": attended}


def mean_metrics(probes: list[LayerProbe]) -> dict[str, torch.Tensor]:
    """Each metric averaged over prompts."""
    per_prompt = [layer_metrics(p) for p in probes]
    return {name: torch.stack([m[name] for m in per_prompt]).mean(0) for name in per_prompt[0]}


def plan_score(recall: torch.Tensor, filter_layers: list[int], wait_layers: int) -> dict[str, float]:
    """Mean and worst ``recall[filter(m)][m]`` over the sparse layers m of the plan."""
    plan = LayerPlan.build(recall.shape[0], list(filter_layers), wait_layers)
    values = [
        float(recall[segment.filter_layer, layer]) for segment in plan.segments for layer in segment.sparse_layers
    ]
    if not values:
        return {"mean": 1.0, "worst": 1.0, "worst_layer": -1}
    worst = min(range(len(values)), key=values.__getitem__)
    sparse = [layer for segment in plan.segments for layer in segment.sparse_layers]
    return {"mean": sum(values) / len(values), "worst": values[worst], "worst_layer": sparse[worst]}


def suggest_filter_layers(recall: torch.Tensor, count: int, first_layer: int, wait_layers: int) -> list[int]:
    """The `count` filter layers, starting at `first_layer`, whose plan has the highest mean recall.

    Ties go to the higher worst layer, then to the earlier layers. Exhaustive over the later layers
    when that is at most ``EXHAUSTIVE_LIMIT`` plans, else greedy (add the best layer one at a time).
    """
    layers = recall.shape[0]
    if not 1 <= count <= layers - first_layer:
        raise ValueError(f"count must be in 1..{layers - first_layer} with the first filter layer at {first_layer}")
    candidates = range(first_layer + 1, layers)

    def key(rest: tuple[int, ...]) -> tuple[float, float]:
        score = plan_score(recall, [first_layer, *sorted(rest)], wait_layers)
        return (round(score["mean"], 6), round(score["worst"], 6))

    combinations = sum(1 for _ in itertools.islice(itertools.combinations(candidates, count - 1), EXHAUSTIVE_LIMIT + 1))
    if combinations <= EXHAUSTIVE_LIMIT:
        best = max(itertools.combinations(candidates, count - 1), key=key)  # max keeps the first (earliest) tie
        return [first_layer, *best]
    chosen: tuple[int, ...] = ()
    for _ in range(count - 1):
        chosen = max((tuple(sorted((*chosen, c))) for c in candidates if c not in chosen), key=key)
    return [first_layer, *chosen]


def save_heatmaps(metrics: dict[str, torch.Tensor], path: str, marked: list[int] | None = None) -> None:
    """One PNG with a heatmap per metric (needs matplotlib: ``pip install omnikv-runtime[plot]``)."""
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the heatmap needs matplotlib: pip install 'omnikv-runtime[plot]'") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {
        "iou": "IoU of top-k sets",
        "mass": "attention mass of m on l's set",
        "recall": "recall of m's top-k (no sinks) by l's set",
        "attended": "m's attended non-sink mass on l's set",
    }
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4.2))
    for ax, (name, values) in zip(axes, metrics.items()):
        image = ax.imshow(values.numpy(), vmin=0.0, vmax=1.0, cmap="viridis", origin="upper")
        ax.set_title(titles.get(name, name), fontsize=10)
        ax.set_xlabel("layer m (served)")
        ax.set_ylabel("layer l (selecting)")
        for i, layer in enumerate(marked or []):
            label = "red rows: suggested filter layers" if i == 0 else None
            ax.axhline(layer, color="red", linewidth=0.6, alpha=0.7, label=label)
        if marked and ax is axes[0]:
            ax.legend(loc="upper right", fontsize=7, framealpha=0.85)
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

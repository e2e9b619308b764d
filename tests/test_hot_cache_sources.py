"""The selection-sources analysis of ``benchmarks/hot_cache.py``: known overlaps of a tiny hand-made trace."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def test_sources_counts_what_was_known_before_each_filter_layer_picked(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import hot_cache

    trace = tmp_path / "trace.safetensors"
    earlier = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32)
    later = torch.tensor([[0, 5], [2, 1], [2, 4]], dtype=torch.int32)
    save_file({"p/layer2": earlier, "p/layer6": later}, str(trace))
    result = hot_cache.sources(type("Args", (), {"trace": str(trace)})())
    (row,) = result["rows"]
    # step 1 picks {2, 1}: none of step 0's {0, 5}, half of layer 2's {2, 3}; 3 would move in vain
    # step 2 picks {2, 4}: half of step 1's {2, 1}, half of layer 2's {4, 5}, both from either; 5 in vain
    assert (row["layer"], row["earlier"], row["steps"]) == (6, 2, 2)
    assert row["previous_step"] == 0.25 and row["earlier_layer"] == 0.5 and row["either"] == 0.75
    assert row["moved_in_vain"] == 0.5

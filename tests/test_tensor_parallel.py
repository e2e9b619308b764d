"""Tensor-parallel OmniKV through DeepSpeed AutoTP, on CPU with gloo, launched the way users launch it.

`torchrun --nproc-per-node 2` runs tests/scripts/tp_generate.py: each rank holds one of the tiny
model's two KV heads (and half of every layer), and both ranks must give the tokens and the
per-step selections of every filter layer that one rank gives, at full budget and at 8 of 48
tokens, through `engine.generate` and through transformers' `generate` with the runtime's cache.
Without the all-reduce of the filter scores the ranks disagree (checked when this was written);
the budget-8 run differing from the full-budget one shows the selection is doing something.
Bad tensor-parallel configs fail with a ConfigError that says what to change.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
from okv_testlib import make_model, omni

import omnikv_runtime as okv
from omnikv_runtime.errors import ConfigError
from omnikv_runtime.planner import ModelGeometry, plan_memory

TIER_KEYS = ("gpu_dense", "gpu_selected", "gpu_tail", "gpu_hot", "host", "host_allocated")

SCRIPT = Path(__file__).parent / "scripts" / "tp_generate.py"
SERVE_SCRIPT = Path(__file__).parent / "scripts" / "tp_serve.py"
BF16_SCRIPT = Path(__file__).parent / "scripts" / "tp_bf16.py"
SCHEDULER_SCRIPT = Path(__file__).parent / "scripts" / "tp_scheduler.py"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run(command: list[str], out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command + [str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def test_two_ranks_give_one_ranks_tokens_and_selections(tmp_path):
    _run([sys.executable, str(SCRIPT)], tmp_path / "one")
    port = str(_free_port())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    _run([*torchrun, str(SCRIPT)], tmp_path / "two")
    one = json.loads((tmp_path / "one.rank0.json").read_text())
    ranks = [json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for budget in ("1.0", "8"):
        single = one["budgets"][budget]
        assert single["kv_heads_on_this_rank"] == 2
        assert single["tokens"] == single["tokens_through_cache"]
        assert sorted(single["selections"]) == ["1", "4"] and len(single["selections"]["1"]) == 15
        for rank in ranks:
            shard = rank["budgets"][budget]
            assert shard["kv_heads_on_this_rank"] == 1  # each rank holds its own KV head only
            assert shard["tokens"] == single["tokens"]
            assert shard["tokens_through_cache"] == single["tokens"]
            assert shard["selections"] == single["selections"]
        _planned_per_rank(budget, one["budgets"][budget], [rank["budgets"][budget] for rank in ranks])
    assert one["budgets"]["8"]["tokens"] != one["budgets"]["1.0"]["tokens"]
    assert len(one["budgets"]["8"]["selections"]["1"][0][0]) == 8


def test_two_ranks_serve_each_request_the_tokens_it_gets_alone(tmp_path):
    """The server's batch (slots joining and leaving between steps, per-row selection) under tensor
    parallelism: every rank gives each request the tokens ``engine.generate`` gives it alone, and the
    tokens one rank gives, with the offloaded tier and with a hot cache."""
    _run([sys.executable, str(SERVE_SCRIPT)], tmp_path / "one")
    port = str(_free_port())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    _run([*torchrun, str(SERVE_SCRIPT)], tmp_path / "two")
    one = json.loads((tmp_path / "one.rank0.json").read_text())
    ranks = [json.loads((tmp_path / f"two.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    for hot in ("0", "12"):
        single = one["tiers"][hot]
        assert single["kv_heads_on_this_rank"] == 2
        assert single["batch"] == single["alone"]
        assert [len(tokens) for tokens in single["batch"]] == [9, 5, 6]
        for rank in ranks:
            shard = rank["tiers"][hot]
            assert shard["kv_heads_on_this_rank"] == 1  # each rank holds its own KV head only
            assert shard["batch"] == shard["alone"] == single["alone"]
    assert one["tiers"]["0"]["alone"] == one["tiers"]["12"]["alone"]  # the hot cache changes no token


def test_rank_0_schedules_and_rank_1_follows_its_plans(tmp_path):
    """The server's scheduler on two ranks: rank 0 decides each turn and sends it; rank 1 runs it on its own
    batch. Requests arrive while others decode, wait for a slot, end at a stop string, are cancelled while
    decoding or as soon as sent, and one samples with a seed after an idle spell. Each greedy request gets
    what ``engine.generate`` gives it alone on the same ranks, the sampled one what a one-rank scheduler gives
    it, and both ranks run the same turns and end with every slot free. The last request shares the first's
    first 48 tokens: rank 0's plan reuses them, and both ranks' prefix caches hold the same blocks."""
    port = str(_free_port())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    _run([*torchrun, str(SCHEDULER_SCRIPT)], tmp_path / "serve")
    ranks = [json.loads((tmp_path / f"serve.rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["alone"] == ranks[1]["alone"]
    assert ranks[0]["turns"] == ranks[1]["turns"] > 0
    assert ranks[0]["prefill"] == ranks[1]["prefill"] and ranks[0]["packed_forwards"] == ranks[1]["packed_forwards"] > 0
    for rank in ranks:
        assert rank["free_slots"] == [0, 1] and rank["host_used"] == 0
    served, alone, finish = ranks[0]["tokens"], ranks[0]["alone"], ranks[0]["finish"]
    for name in ("a", "c", "f", "g"):
        assert served[name] == alone[name] and finish[name] == "length", name
    assert ranks[0]["prefix_hit_tokens"] == 48  # g's first 48 tokens, a's, came from the prefix cache
    assert ranks[0]["prefix_blocks"] == ranks[1]["prefix_blocks"] and len(ranks[0]["prefix_blocks"]) > 3
    assert served["b"] == alone["b"][:3] and finish["b"] == "stop"  # its stop string is its third token's text
    assert 2 <= len(served["d"]) < len(alone["d"]) and served["d"] == alone["d"][: len(served["d"])]
    assert served["e"] == alone["e"][: len(served["e"])]
    assert finish["d"] == finish["e"] == "cancelled"
    assert served["s"] == ranks[0]["sampled_one_rank"] and len(served["s"]) == 12 and finish["s"] == "length"


@pytest.mark.slow
def test_omnikv_serve_on_three_ranks_answers_and_stops_with_rank_0(tmp_path, bundled):
    """The command itself under torchrun (the bundled model's 3 KV heads over 3 ranks, 16 s on a 2-core
    box): rank 0 answers HTTP with one rank's greedy text, the others follow; SIGINT to rank 0 alone stops
    every rank (the followers log it and leave the group with rank 0)."""
    import httpx
    import psutil

    model, tokenizer = bundled
    config = {
        "model": {"name_or_path": "smollm2-135m", "dtype": "float32"},
        "omnikv": {"filter_layers": [2, 6, 18], "wait_layers": 1, "token_budget": 0.25},
        "offload": {"device": "cpu"},
        "prefill": {"chunk_size": 64},
    }
    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    alone = okv.initialize(model, config, tokenizer=tokenizer).generate(ids, max_new_tokens=10)[0, ids.shape[1] :]
    path = tmp_path / "tp3.json"
    path.write_text(json.dumps({**config, "distributed": {"tp_size": 3}}))
    port, log = _free_port(), tmp_path / "serve.log"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "3", "--master-port"]
    command = [*torchrun, str(_free_port()), "-m", "omnikv_runtime.cli", "serve", "--config", str(path)]
    command += ["--port", str(port), "--max-context", "192", "--max-batch", "2"]
    with log.open("wb") as stderr:
        launcher = subprocess.Popen(command, stderr=stderr, stdout=stderr, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert launcher.poll() is None, log.read_text()[-3000:]
            threading.Event().wait(0.5)
        body = {"prompt": prompt, "max_tokens": 10, "temperature": 0}
        answer = httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()
        assert answer["choices"][0]["text"] == tokenizer.decode(alone, skip_special_tokens=True)
        ranks = {int(p.environ()["RANK"]): p for p in psutil.Process(launcher.pid).children()}
        assert sorted(ranks) == [0, 1, 2]
        ranks[0].send_signal(signal.SIGINT)
        launcher.wait(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    text = log.read_text()
    assert "rank 1: rank 0 stopped after" in text and "rank 2: rank 0 stopped after" in text, text[-3000:]


def test_bf16_float32_partial_sums_round_once_as_one_rank(tmp_path):
    """``distributed.float32_partial_sums``: on inputs whose float32 sums are exact in any order, each
    row-parallel layer (attention output, MLP down projection, LM head) gives one rank's float32-accumulated
    product rounded once to bf16, element for element; DeepSpeed's own bf16 partial sums do not. Through a
    tiny bf16 model the ranks then stay closer to one rank's logits and tokens than without the switch; where
    the tokens still part, the one rank's logits of the two tokens were within the difference the float32
    sums taken in another order left before (two ranks sum each half of a projection's inputs, then the
    halves: float32 sums in another order, which round to another bf16 value now and then)."""
    port = str(_free_port())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", port]
    _run([*torchrun, str(BF16_SCRIPT)], tmp_path / "bf16")
    ranks = [json.loads((tmp_path / f"bf16.rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # the LM head's all-reduce gives every rank the same logits
    result = ranks[0]
    assert result["layers"]["on"] == {"o_proj": 0, "down_proj": 0, "lm_head": 0}
    assert all(count > 0 for count in result["layers"]["off"].values()), result["layers"]["off"]
    on, off = result["logits"]["on"], result["logits"]["off"]
    assert on["elements_differing"] < off["elements_differing"]
    assert on["max_abs_difference"] < off["max_abs_difference"]
    rows = {key: [row for budget in result["tokens"].values() for row in budget[key]] for key in ("on", "off")}
    assert sum(row["agree"] for row in rows["on"]) > sum(row["agree"] for row in rows["off"])
    for row in rows["on"]:
        assert row["agree"] >= 1  # the prompt's next token is one rank's
        if row["margin"] is not None:
            assert row["margin"] <= row["noise"], row


def _planned_per_rank(budget: str, single: dict, shards: list[dict]) -> None:
    """The planner's per-rank tiers with tp_size 2 are each rank's allocated tier bytes, half of one rank's."""
    config = {
        "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": float(budget) if "." in budget else 8},
        "offload": {"device": "cpu"},
        "prefill": {"chunk_size": 16},
        "distributed": {"tp_size": 2},
    }
    geometry = ModelGeometry(
        num_layers=8, num_heads=4, kv_heads=2, head_dim=16, hidden=64, intermediate=128, vocab=256, max_positions=512
    )
    plan = plan_memory(geometry, okv.load_config(config), 48, batch=2, new_tokens=16)
    for shard in shards:
        assert {key: plan.tiers[key] for key in TIER_KEYS} == {key: shard["tier_bytes"][key] for key in TIER_KEYS}
    for key in TIER_KEYS:
        assert single["tier_bytes"][key] == 2 * shard["tier_bytes"][key]
    assert plan.host == 2 * plan.host_per_rank
    # DeepSpeed splits the LM head in 64-wide slices of the hidden size (all 64 on rank 0 here): summed
    # over the ranks, each holds the embeddings and norms whole and half of everything else
    assert sum(shard["parameters"] for shard in shards) == 2 * geometry.rank_param_count(2)
    assert plan.weights == geometry.rank_param_count(2) * 4


def test_tp_size_must_split_the_kv_heads():
    with pytest.raises(ConfigError, match=r"distributed.tp_size.*divisor of the model's 2 KV heads.*\[1, 2\]"):
        okv.initialize(make_model("llama"), {**omni(8), "distributed": {"tp_size": 3}})


def test_tp_size_needs_a_launcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="torchrun --nproc-per-node N"):
        okv.initialize(make_model("llama"), {**omni(8), "distributed": {"tp_size": 2}})


def test_tp_size_without_deepspeed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed raises ImportError
    with pytest.raises(ConfigError, match=r"pip install omnikv-runtime\[deepspeed\]"):
        okv.initialize(make_model("llama"), {**omni(8), "distributed": {"tp_size": 2}})


def test_a_policy_ranks_cannot_agree_on_is_refused(monkeypatch):
    import omnikv_runtime.engine as engine_module

    monkeypatch.setattr(engine_module, "tensor_parallel", lambda model, config: model)
    monkeypatch.setattr(engine_module, "tensor_parallel_group", lambda config: object())
    with pytest.raises(ConfigError, match="omnikv.selector.type.*h2o.*last, softmax_last"):
        okv.initialize(make_model("llama"), {**omni(8, selector="h2o"), "distributed": {"tp_size": 2}})


def _bf16_weights_fp32_buffers():
    """A tiny Llama as a bf16 checkpoint loads: bf16 weights, rotary frequencies still float32."""
    model = make_model("llama")
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    return model


def test_deepspeeds_dtype_cast_leaves_the_rotary_frequencies_in_float32(monkeypatch):
    # DeepSpeed's init_inference casts every floating-point buffer to the weights' dtype; in bf16 the
    # rotary angles at long positions are off by radians (on two H200s at 128K: other tokens from step 0)
    from omnikv_runtime import distributed

    def init_inference(model, tensor_parallel, dtype, replace_with_kernel_inject):
        return types.SimpleNamespace(module=model.to(dtype))

    monkeypatch.setattr(distributed, "_import_deepspeed", lambda: types.SimpleNamespace(init_inference=init_inference))
    monkeypatch.setattr(distributed, "_join_process_group", lambda deepspeed, backend, tp_size: None)
    monkeypatch.setattr(distributed.dist, "get_rank", lambda: 0)
    model = _bf16_weights_fp32_buffers()
    before = {name: buffer.clone() for name, buffer in model.named_buffers() if buffer.dtype == torch.float32}
    assert any(name.endswith("inv_freq") for name in before)
    sharded = distributed.tensor_parallel(model, okv.load_config({"distributed": {"tp_size": 2}}))
    assert next(sharded.parameters()).dtype == torch.bfloat16
    after = dict(sharded.named_buffers())
    for name, buffer in before.items():
        assert after[name].dtype == torch.float32 and torch.equal(after[name], buffer), name


def test_restore_float32_buffers_puts_back_only_what_was_cast():
    from omnikv_runtime.distributed import float32_buffers, restore_float32_buffers

    model = _bf16_weights_fp32_buffers()
    kept = float32_buffers(model)
    assert restore_float32_buffers(model, kept) == 0  # nothing cast yet
    model.to(torch.bfloat16)
    assert restore_float32_buffers(model, kept) == len(kept) > 0
    assert all(buffer.dtype == torch.float32 for name, buffer in model.named_buffers() if name in kept)


def test_float32_partial_sums_refuse_a_row_parallel_layer_they_do_not_handle():
    from omnikv_runtime.distributed import reduce_partial_sums_in_float32

    class LinearAllreduce(torch.nn.Module):  # DeepSpeed's names; a subclass with a forward of its own
        pass

    class Conv_LinearALlreduce(LinearAllreduce):  # noqa: N801 - DeepSpeed's spelling
        pass

    model = torch.nn.Sequential(Conv_LinearALlreduce())
    with pytest.raises(ConfigError, match=r"distributed.float32_partial_sums.*Conv_LinearALlreduce.*LinearAllreduce"):
        reduce_partial_sums_in_float32(model)


def test_tp_arithmetic_finds_the_row_parallel_rounding(tmp_path):
    """benchmarks/tp_arithmetic.py on a CPU at small widths: each rank's bf16 partial sums rounded before
    they are added differ from one GEMM in a large share of the outputs; float32 partial sums in a handful."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
    import tp_arithmetic

    out = tmp_path / "arithmetic.json"
    argv = ["--tiny", "--device", "cpu", "--tp-sizes", "2", "--tokens", "4,64", "--batches", "2"]
    assert tp_arithmetic.main([*argv, "--contexts", "256", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {row["source"] for row in rows} == {"column", "row bf16", "row float32", "attention"}
    rounded_rows, wide_rows = ([r for r in rows if r["source"] == s] for s in ("row bf16", "row float32"))
    for rounded, wide in zip(rounded_rows, wide_rows, strict=True):
        assert rounded["what"] == wide["what"] and rounded["share"] > 0.2 and wide["share"] < 0.01, (rounded, wide)

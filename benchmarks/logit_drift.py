"""Budget-1.0 drift against dense, per host-tier dtype (used by accuracy.py ``--logit-steps``).

At a budget of 1.0 every sparse layer attends to every prompt token, so the only difference from
dense is how the host tier stores them (FP8 codes, or the model's dtype) and rounding. Two figures:

- **logits**: dense decodes ``steps`` greedy tokens; each run is then fed exactly those tokens
  (teacher forcing), so both compute logits over the same sequence, and the largest absolute
  difference over all steps and the vocabulary is reported;
- **tokens**: each run decodes ``steps`` greedy tokens on its own; how many differ from dense's
  at the same position, and the first step that differs (None: all equal).

Decoding is driven by hand through each engine's cache and never stops at EOS, so every run
really makes ``steps`` steps (the model goes on past its answer).
"""

from __future__ import annotations

import inspect
import time
from typing import Any

import torch

import omnikv_runtime as okv
from omnikv_runtime.eval.passkey import build_passkey_prompt
from omnikv_runtime.layout import reserve_tokens


def decode_by_hand(engine: Any, ids: torch.Tensor, steps: int, forced: torch.Tensor | None = None):
    """``steps`` greedy steps through the engine's cache, without stopping at EOS: (tokens ``[1, steps]``,
    float32 logits ``[steps, vocab]``). With ``forced`` ``[1, steps]`` each step is fed those tokens
    instead of its own (teacher forcing), so two runs compute logits over the same sequence."""
    model = engine.model
    cache = engine.new_cache(reserve_tokens=reserve_tokens(ids.shape[1], steps), prompt_tokens=ids.shape[1])
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    keyword = {name: cache}
    logits, tokens = [], []
    with torch.inference_mode():
        step_logits = model(input_ids=ids, use_cache=True, **keyword).logits[0, -1].float()
        for step in range(steps):
            logits.append(step_logits)
            tokens.append(step_logits.argmax().view(1, 1))
            if step + 1 < steps:
                fed = tokens[-1] if forced is None else forced[:, step : step + 1]
                step_logits = model(input_ids=fed, use_cache=True, **keyword).logits[0, -1].float()
    return torch.cat(tokens, dim=1), torch.stack(logits)


def logit_drift(
    model: Any,
    tokenizer: Any,
    base: Any,
    host_dtypes: list[str],
    length: int,
    steps: int,
    dense: Any = None,
) -> dict[str, Any]:
    """The drift figures (see the module docstring) for a passkey prompt of ``length`` tokens."""
    text, key = build_passkey_prompt(tokenizer, length, 0.5, seed=0)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    if dense is None:
        dense = okv.initialize(model, {"omnikv": {"enabled": False}}, tokenizer=tokenizer)
    started = time.perf_counter()
    dense_tokens, dense_logits = decode_by_hand(dense, ids, steps)
    result: dict[str, Any] = {
        "prompt_tokens": ids.shape[1],
        "steps": steps,
        "budget": 1.0,
        "dense_answer": tokenizer.decode(dense_tokens[0, :16], skip_special_tokens=True).strip(),
        "passkey": key,
        "runs": {},
    }
    for host_dtype in host_dtypes:
        config = base.model_copy(deep=True)
        config.omnikv.token_budget = 1.0
        config.offload.host_dtype = host_dtype
        engine = okv.initialize(model, config, tokenizer=tokenizer)
        tokens, _ = decode_by_hand(engine, ids, steps)
        _, logits = decode_by_hand(engine, ids, steps, forced=dense_tokens)
        differing = (tokens != dense_tokens)[0]
        gap = (logits - dense_logits).abs()
        result["runs"][host_dtype] = {
            "steps": steps,
            "max_abs_logit_diff": float(gap.max()),
            "mean_abs_logit_diff": float(gap.mean()),
            "step_of_max_diff": int(gap.max(dim=1).values.argmax()),
            "max_abs_logit": float(dense_logits.abs().max()),
            "teacher_forced_argmax_differs": int((logits.argmax(-1) != dense_logits.argmax(-1)).sum()),
            "tokens_differing": int(differing.sum()),
            "first_difference": int(differing.nonzero()[0]) if differing.any() else None,
            "answer": tokenizer.decode(tokens[0, :16], skip_special_tokens=True).strip(),
        }
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result

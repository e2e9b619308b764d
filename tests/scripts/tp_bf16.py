"""bf16 under tensor parallelism: the row-parallel layers' float32 partial sums against one rank.

Two ranks, as users launch them: ``torchrun --nproc-per-node 2 tests/scripts/tp_bf16.py OUT``. Every
rank builds a tiny random Llama in bf16 (hidden size 128, so that DeepSpeed splits the LM head too)
with ``distributed.float32_partial_sums`` on and off, and, in the same process, the same model on one
rank. It writes ``OUT.rank<R>.json`` with

- ``layers``: for the attention output, the MLP down projection and the LM head, on crafted inputs whose
  float32 sums are exact in any order, how many output elements differ from the one-rank product
  accumulated in float32 and rounded once to bf16, with the switch on and off;
- ``tokens``: greedy tokens through the runtime's cache at budgets 1.0 and 8 (two rows, one left-padded),
  two ranks with the switch on and off against one rank: how long they agree, and where they part, the one
  rank's logit margin that the ranks' rounding overcame;
- ``logits``: the prompt's last logits of one forward (two rows, one left-padded), two ranks against one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' shared helpers
from okv_testlib import make_model  # noqa: E402

import omnikv_runtime as okv  # noqa: E402
from omnikv_runtime.distributed import leave_process_group  # noqa: E402
from omnikv_runtime.layout import reserve_tokens  # noqa: E402

NEW_TOKENS = 16
HIDDEN = 128  # DeepSpeed splits an LM head in slices of 64 features: 128 gives each rank one


def bf16_model():
    """The same tiny random Llama on every rank and every call, in bf16 (rotary frequencies in float32)."""
    model = make_model("llama", hidden_size=HIDDEN)
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    return model


def engine_for(world: int, float32_sums: bool, budget: float | int = 1.0):
    config = {
        "omnikv": {"filter_layers": [1, 4], "wait_layers": 1, "token_budget": budget},
        "offload": {"device": "cpu"},
        "prefill": {"chunk_size": 16},
        "distributed": {"tp_size": world, "float32_partial_sums": float32_sums},
    }
    return okv.initialize(bf16_model(), config)


def row_parallel_layers(model) -> dict[str, torch.nn.Module]:
    layer = model.model.layers[0]
    return {"o_proj": layer.self_attn.o_proj, "down_proj": layer.mlp.down_proj, "lm_head": model.lm_head}


def layer_mismatches(engine, rank: int, world: int) -> dict[str, int]:
    """Each row-parallel layer on crafted weights and inputs: output elements that differ from one rank's
    float32-accumulated product rounded once to bf16. Weights are multiples of 1/8 in [-1, 1] and inputs
    multiples of 1/4 in [-2, 2], so every float32 sum is exact in any order: the only rounding that can
    differ is to bf16."""
    generator = torch.Generator().manual_seed(5)
    mismatches = {}
    for name, module in row_parallel_layers(engine.model).items():
        out_features, width = module.weight.shape
        features = width * world  # even splits here: rank r holds columns [r * width, (r + 1) * width)
        weight = (torch.randint(-8, 9, (out_features, features), generator=generator) / 8).to(torch.bfloat16)
        inputs = (torch.randint(-8, 9, (1, 6, features), generator=generator) / 4).to(torch.bfloat16)
        expected = (inputs.float() @ weight.float().t()).to(torch.bfloat16)
        columns = slice(rank * width, (rank + 1) * width)
        module.weight.data.copy_(weight[:, columns])
        whole_input = name == "lm_head"  # the LM head takes the whole hidden state and slices it itself
        with torch.inference_mode():
            output = module(inputs if whole_input else inputs[..., columns].contiguous())
        assert output.dtype == torch.bfloat16 and output.shape == expected.shape
        mismatches[name] = int((output != expected).sum())
    return mismatches


PROMPT = torch.randint(3, 256, (2, 48), generator=torch.Generator().manual_seed(1))
MASK = torch.ones_like(PROMPT)
MASK[1, :7] = 0
PROMPT[1, :7] = 0


def last_logits(engine) -> torch.Tensor:
    with torch.inference_mode():
        return engine.model(input_ids=PROMPT, attention_mask=MASK).logits[:, -1].float()


def generate_with_scores(engine) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy new tokens ``[2, NEW_TOKENS]`` and each step's logits ``[2, NEW_TOKENS, vocab]`` (float32),
    through transformers' ``generate`` with the runtime's cache."""
    cache = engine.new_cache(reserve_tokens=reserve_tokens(PROMPT.shape[1], NEW_TOKENS), prompt_tokens=PROMPT.shape[1])
    with torch.inference_mode():
        out = engine.model.generate(
            PROMPT,
            attention_mask=MASK,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
            **{engine.cache_keyword: cache},
        )
    return out.sequences[:, PROMPT.shape[1] :], torch.stack(out.scores, dim=1).float()


def against_one_rank(one: tuple[torch.Tensor, torch.Tensor], two: tuple[torch.Tensor, torch.Tensor]) -> list[dict]:
    """Per row: ``agree``, the tokens equal to one rank's before the first that is not; ``margin``, at that step
    the one rank's logit of its token less its logit of the token two ranks chose; ``noise``, the largest logit
    difference between the two runs over the steps before it."""
    rows = []
    for row in range(one[0].shape[0]):
        differing = (one[0][row] != two[0][row]).nonzero()
        agree = int(differing[0]) if len(differing) else NEW_TOKENS
        noise = float((one[1][row, :agree] - two[1][row, :agree]).abs().max()) if agree else None
        margin = None
        if agree < NEW_TOKENS:
            mine, theirs = int(one[0][row, agree]), int(two[0][row, agree])
            margin = float(one[1][row, agree, mine] - one[1][row, agree, theirs])
        rows.append({"agree": agree, "margin": margin, "noise": noise})
    return rows


def main() -> int:
    out = sys.argv[1]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    result: dict = {"world": world, "layers": {}, "tokens": {}, "logits": {}}
    reference_logits = last_logits(engine_for(1, False))
    for switch in (True, False):
        key = "on" if switch else "off"
        result["layers"][key] = layer_mismatches(engine_for(world, switch), rank, world)
        logits = last_logits(engine_for(world, switch))
        result["logits"][key] = {
            "elements_differing": int((logits != reference_logits).sum()),
            "max_abs_difference": float((logits - reference_logits).abs().max()),
            "elements": logits.numel(),
        }
    for budget in (1.0, 8):
        one = generate_with_scores(engine_for(1, False, budget))
        result["tokens"][str(budget)] = {
            key: against_one_rank(one, generate_with_scores(engine_for(world, switch, budget)))
            for key, switch in (("on", True), ("off", False))
        }
    with open(f"{out}.rank{rank}.json", "w", encoding="utf-8") as handle:
        json.dump(result, handle)
    leave_process_group()  # a rank exiting while another still runs aborts gloo's teardown
    return 0


if __name__ == "__main__":
    sys.exit(main())

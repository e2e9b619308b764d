"""Turning a task's prompt into a prediction: middle truncation, chat template, chain of thought.

Middle truncation (as LongBench, InfiniteBench and the seed do): a prompt longer than the budget
keeps its first and last halves of tokens, since instructions sit at both ends. The budget is the
context limit minus the tokens to be generated (and the chat template's own), so the engine never
refuses a prompt for length. With ``generation.cot`` the model first writes its reasoning after
"Let's think step by step." and is then asked, in a second turn, for the final answer only; the
final answer is scored and the reasoning is kept in the record.

With a chat template, a task's answer cue (InfiniteBench's "... The pass key is") opens the
assistant's turn rather than closing the user's, so that a chat model completes it as the
plain-text templates intend.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from transformers import PreTrainedTokenizerBase

from omnikv_runtime.engine import Engine
from omnikv_runtime.errors import PromptError
from omnikv_runtime.eval.data import Sample
from omnikv_runtime.eval.task import TaskSpec

logger = logging.getLogger(__name__)

COT_PREFIX = "Let's think step by step."
COT_QUESTION = "Now give only the final answer, in the format asked for above, without explanation."
COT_PLAIN_CUE = "\n\nTherefore, the final answer is:"
COT_MIN_TOKENS = 64  # reasoning gets 2x the answer's tokens, at least this many


def truncate_middle(ids: list[int], budget: int) -> tuple[list[int], list[int]] | None:
    """The first and last halves of ``ids`` when it is longer than ``budget`` (None when it fits)."""
    if len(ids) <= budget:
        return None
    half = budget // 2
    return ids[:half], ids[len(ids) - half :]


class Predictor:
    """Generates one task sample's answer with an engine; ``limit`` is the context limit in tokens."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: PreTrainedTokenizerBase,
        limit: int,
        use_chat_template: bool,
        cot: bool,
        max_new_tokens: int | None = None,
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.limit = limit
        self.use_chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.cot = cot
        self.cap = max_new_tokens

    def _wrap(self, messages: list[dict[str, str]] | str, chat: bool, cue: str = "") -> list[int]:
        """Encode a prompt (or chat messages): the chat template with ``cue`` opening the answer, or plain text."""
        if chat:
            if isinstance(messages, str):
                messages = [{"role": "user", "content": messages}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text + cue, add_special_tokens=False)["input_ids"]
        return self.tokenizer(messages + cue, add_special_tokens=True)["input_ids"]

    def fit(self, prompt: str, chat: bool, reserve: int, cue: str = "") -> tuple[str, list[int], bool]:
        """The prompt cut in the middle so that its encoding plus ``reserve`` tokens fits the limit."""
        ids = self._wrap(prompt, chat, cue)
        if len(ids) + reserve <= self.limit:
            return prompt, ids, False
        raw = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        budget = self.limit - reserve - (len(ids) - len(raw))
        for _ in range(4):  # decoding and re-encoding at the cut can shift a few tokens
            if budget <= 0:
                break
            head, tail = truncate_middle(raw, budget) or (raw, [])
            cut = self.tokenizer.decode(head, skip_special_tokens=True) + self.tokenizer.decode(
                tail, skip_special_tokens=True
            )
            ids = self._wrap(cut, chat, cue)
            excess = len(ids) + reserve - self.limit
            if excess <= 0:
                return cut, ids, True
            budget -= excess
        raise PromptError(
            f"cannot fit the prompt: the context limit is {self.limit} tokens and {reserve} are reserved for "
            "generation; raise model.max_context_len or lower --max-new-tokens"
        )

    def _generate(self, ids: list[int], max_new: int, stop_at_newline: bool) -> str:
        kwargs: dict[str, Any] = {}
        if stop_at_newline:
            eos = self.engine.model.generation_config.eos_token_id
            eos = list(eos) if isinstance(eos, (list, tuple)) else [eos] if eos is not None else []
            newline = self.tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
            kwargs["eos_token_id"] = [*eos, newline]
        out = self.engine.generate([ids], max_new_tokens=max_new, **kwargs)
        return self.tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)

    def predict(self, spec: TaskSpec, sample: Sample) -> dict[str, Any]:
        """``{"pred", "prompt_tokens", "truncated", ["reasoning"]}`` for one sample."""
        start = time.perf_counter()
        chat = self.use_chat and spec.chat
        max_new = min(spec.max_new_tokens, self.cap) if self.cap else spec.max_new_tokens
        reasoning_new = max(2 * max_new, COT_MIN_TOKENS) if self.cot else 0
        if self.cot and self.cap:
            reasoning_new = min(reasoning_new, self.cap)
        cue_tokens = 48 if self.cot else 0  # the second turn's question and template
        prompt, cue = spec.prompt(sample), ""
        if chat and spec.cue is not None and spec.cue(sample) and prompt.endswith(spec.cue(sample)):
            cue = spec.cue(sample)
            prompt = prompt.removesuffix(cue).rstrip()
        reserve = max_new + reasoning_new + cue_tokens
        prompt, ids, truncated = self.fit(prompt, chat, reserve, "" if self.cot else cue)
        record: dict[str, Any] = {"prompt_tokens": len(ids), "truncated": truncated}
        if not self.cot:
            record["pred"] = self._generate(ids, max_new, spec.stop_at_newline)
        else:
            if chat:
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
                first = self.tokenizer(text + COT_PREFIX, add_special_tokens=False)["input_ids"]
            else:
                first = self.tokenizer(f"{prompt}\n{COT_PREFIX}", add_special_tokens=True)["input_ids"]
            reasoning = self._generate(first, reasoning_new, False)
            if chat:
                messages = [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": f"{COT_PREFIX} {reasoning.strip()}"},
                    {"role": "user", "content": COT_QUESTION},
                ]
                second = self._wrap(messages, True, cue)
            else:
                second = self.tokenizer(f"{prompt}\n{COT_PREFIX}{reasoning}{COT_PLAIN_CUE}", add_special_tokens=True)[
                    "input_ids"
                ]
            record["reasoning"] = reasoning
            record["pred"] = self._generate(second, max_new, spec.stop_at_newline)
        record["seconds"] = round(time.perf_counter() - start, 3)
        return record

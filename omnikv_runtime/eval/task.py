"""What the runner needs to know about one task: prompt, generation length, chat use, scoring."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from omnikv_runtime.eval.data import Sample


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark task.

    ``load(data_dir, limit)`` returns the samples (raising EvalDataError on bad data), ``prompt``
    renders one, ``score(prediction, sample)`` gives a value in [0, 1]. ``chat`` False keeps the
    prompt out of the chat template whatever the config says (LongBench's few-shot and code
    tasks); ``stop_at_newline`` ends generation at a newline (LongBench's samsum).
    ``cue``: see the field comment.
    """

    name: str
    benchmark: str
    max_new_tokens: int
    metric: str
    prompt: Callable[[Sample], str]
    score: Callable[[str, Sample], float]
    load: Callable[[Path | None, int | None], list[Sample]]
    chat: bool = True
    stop_at_newline: bool = False
    length_buckets: bool = False  # LongBench-E: also report 0-4k / 4-8k / 8k+ scores
    # synthetic tasks: fills a sample's fields and answers in the worker, which has the tokenizer
    prepare: Callable[[Sample, PreTrainedTokenizerBase], Sample] | None = None
    # the prompt's closing words that start the answer ("The pass key is"); with a chat template
    # they open the assistant's turn instead of ending the user's
    cue: Callable[[Sample], str] | None = None

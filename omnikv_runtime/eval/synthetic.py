"""Synthetic long-context retrieval tasks that need no data files (seeded, any length and depth).

- ``passkey``, ``number_string``, ``kv_retrieval``: built the way InfiniteBench (Zhang et al., ACL
  2024) builds its retrieval tasks (the same filler line, needle sentences, 5-digit pass keys,
  10-digit strings with repeated digits, a JSON object of UUID pairs) and scored with its prompts
  and scorers, at the lengths and depths asked for instead of 128K.
- ``multi_key``: several named pass keys; the question asks for one of them (first integer).
- ``multi_needle``: several values hidden for the same key; the score is the share of them
  recalled (the multi-value needle of RULER, Hsieh et al., 2024).

A sample id is ``<task>-<length>-<depth>-<index>``; its random draws come from a generator seeded
with ``seed`` and the id, so any worker rebuilds the same sample. Lengths count the rendered
prompt's tokens before the chat template; a prompt never exceeds its length (unless the fixed
parts alone are longer).
"""

from __future__ import annotations

import json
import random
import uuid
import zlib
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

from transformers import PreTrainedTokenizerBase

from omnikv_runtime.eval import infinitebench
from omnikv_runtime.eval.data import Sample
from omnikv_runtime.eval.infinitebench import score_first_int
from omnikv_runtime.eval.task import TaskSpec

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key.\n"
NUMBER_NEEDLE = "The sequence of digits is {key}. Remember it. {key} is the sequence of digits.\n"
MULTI_KEY_NEEDLE = "The pass key of the {name} door is {key}. Remember it.\n"
MULTI_VALUE_NEEDLE = "One of the special magic numbers for {name} is: {key}.\n"
NAMES = ("red", "blue", "green", "yellow", "purple", "orange", "silver", "golden", "white", "black")
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there."
)
MULTI_KEY_TEMPLATE = INTRO + "\n\n{context}\n\n{input}\n\nThe pass key of the {name} door is"
MULTI_NEEDLE_TEMPLATE = INTRO + "\n\n{context}\n\n{input}\n\nThe special magic numbers for {name} are:"
DEFAULT_LENGTHS = (1000, 2000, 3000)
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
ALL_TASKS = ("passkey", "number_string", "kv_retrieval", "multi_key", "multi_needle")
NUM_KEYS = 4  # multi_key: needles in the haystack
NUM_VALUES = 3  # multi_needle: values hidden for the asked key


def _rng(seed: int, sample_id: str) -> random.Random:
    return random.Random(zlib.crc32(f"{seed}:{sample_id}".encode()))


def _digits(rng: random.Random, n: int) -> str:
    return "".join(str(rng.randint(0, 9)) for _ in range(n))


def _number_string(rng: random.Random) -> str:
    """Ten digits: five random ones, each of five more a copy of a neighbour (InfiniteBench)."""
    keys = [str(rng.randint(0, 9)) for _ in range(5)]
    for k in range(5):
        pos = rng.randint(0, 5 + k - 1)
        keys.insert(pos, keys[pos])
    return "".join(keys)


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _fit(tokenizer: PreTrainedTokenizerBase, length: int, render: Callable[[int], str]) -> str:
    """``render(n)`` for the largest n (filler units) whose prompt has at most ``length`` tokens."""

    def size(n: int) -> int:
        return len(tokenizer(render(n), add_special_tokens=False)["input_ids"])

    hi = 8
    while size(hi) <= length:
        hi *= 2
    lo, hi = 0, hi - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(mid) <= length else (lo, mid - 1)
    return render(lo)


def _haystack(n: int, needles: list[tuple[float, str]]) -> str:
    """``n`` noise lines with each needle inserted at its relative depth."""
    lines = [NOISE] * n
    for depth, needle in sorted(needles, key=lambda item: -item[0]):
        lines.insert(round(depth * n), needle)
    return "".join(lines)


def _prepare(task: str, seed: int, sample: Sample, tokenizer: PreTrainedTokenizerBase) -> Sample:
    length, depth = int(sample.extra["length"]), float(sample.extra["depth"])
    rng = _rng(seed, sample.id)
    fields: dict[str, str]
    if task in ("passkey", "number_string"):
        key = _digits(rng, 5) if task == "passkey" else _number_string(rng)
        needle = (PASSKEY_NEEDLE if task == "passkey" else NUMBER_NEEDLE).format(key=key)
        question = "What is the pass key?" if task == "passkey" else "What is the sequence of digits?"
        template = infinitebench.TASKS[task][0]
        fields = {"input": question}

        def render(n: int) -> str:
            fields["context"] = _haystack(n, [(depth, needle)])
            return template.format(**fields)

        answers: list = [key]
    elif task == "kv_retrieval":
        pairs = [(_uuid(rng), _uuid(rng)) for _ in range(4096)]
        template = infinitebench.TASKS[task][0]
        fields = {}

        def render(n: int) -> str:
            n = max(n, 1)
            chosen = min(round(depth * (n - 1)), n - 1)
            records = dict(pairs[:n])
            fields["context"] = "JSON data:\n" + json.dumps(records, ensure_ascii=False)
            fields["input"] = f'Key: "{pairs[chosen][0]}"\nThe value associated with the specified key is: '
            fields["answer"] = pairs[chosen][1]
            return template.format(**fields)

        answers = []
    elif task == "multi_key":
        names = rng.sample(NAMES, NUM_KEYS)
        keys = [_digits(rng, 5) for _ in names]
        depths = [depth] + [rng.random() for _ in names[1:]]
        needles = [(d, MULTI_KEY_NEEDLE.format(name=nm, key=k)) for d, nm, k in zip(depths, names, keys)]
        fields = {"input": f"What is the pass key of the {names[0]} door?", "name": names[0]}

        def render(n: int) -> str:
            fields["context"] = _haystack(n, needles)
            return MULTI_KEY_TEMPLATE.format(**fields)

        answers = [keys[0]]
    else:  # multi_needle
        name = rng.choice(NAMES)
        values = [_digits(rng, 5) for _ in range(NUM_VALUES)]
        depths = [depth] + [rng.random() for _ in values[1:]]
        needles = [(d, MULTI_VALUE_NEEDLE.format(name=name, key=v)) for d, v in zip(depths, values)]
        fields = {"input": f"What are all the special magic numbers for {name}? List them.", "name": name}

        def render(n: int) -> str:
            fields["context"] = _haystack(n, needles)
            return MULTI_NEEDLE_TEMPLATE.format(**fields)

        answers = [values]
    _fit(tokenizer, length, render)
    if task == "kv_retrieval":
        answers = [fields.pop("answer")]
    return replace(sample, fields=dict(fields), answers=answers)


def _stubs(task: str, lengths: tuple[int, ...], depths: tuple[float, ...], samples: int, limit: int | None):
    stubs = [
        Sample(task, f"{task}-{length}-{depth:g}-{index}", {}, [], {"length": length, "depth": depth})
        for length in lengths
        for depth in depths
        for index in range(samples)
    ]
    return stubs[:limit] if limit is not None else stubs


def score_recall(prediction: str, sample: Sample) -> float:
    """Share of the hidden values that appear in the prediction."""
    values = sample.answers[0]
    return sum(value in prediction for value in values) / len(values)


def task_spec(
    name: str,
    lengths: tuple[int, ...] = DEFAULT_LENGTHS,
    depths: tuple[float, ...] = DEFAULT_DEPTHS,
    samples: int = 1,
    seed: int = 0,
) -> TaskSpec:
    """A synthetic task at ``lengths`` x ``depths`` x ``samples`` seeded samples."""
    if not all(0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths must lie in [0, 1], got {list(depths)}")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in lengths):
        raise ValueError(f"lengths must be whole numbers of tokens of at least 1, got {list(lengths)}")

    def load(data_dir: Path | None, limit: int | None) -> list[Sample]:
        return _stubs(name, tuple(lengths), tuple(depths), samples, limit)

    prepare = partial(_prepare, name, seed)
    if name in infinitebench.TASKS:
        return replace(infinitebench.task_spec(name, loader=load), benchmark="synthetic", prepare=prepare)
    if name == "multi_key":
        return TaskSpec(
            name=name,
            benchmark="synthetic",
            max_new_tokens=8,
            metric="first_int",
            prompt=lambda s: MULTI_KEY_TEMPLATE.format(**s.fields),
            score=lambda pred, s: score_first_int(pred, s.answers[0]),
            load=load,
            prepare=prepare,
            cue=lambda s: "The pass key of the {name} door is".format(**s.fields),
        )
    return TaskSpec(
        name=name,
        benchmark="synthetic",
        max_new_tokens=32,
        metric="recall",
        prompt=lambda s: MULTI_NEEDLE_TEMPLATE.format(**s.fields),
        score=score_recall,
        load=load,
        prepare=prepare,
        cue=lambda s: "The special magic numbers for {name} are:".format(**s.fields),
    )

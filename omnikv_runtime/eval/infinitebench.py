"""InfiniteBench (Zhang et al., "∞Bench: Extending Long Context Evaluation Beyond 100K Tokens",
ACL 2024): its 12 tasks with the prompts it uses for open models (the templates the seed OmniKV
used too), its generation lengths and its scorers (``src/compute_scores.py``).

Data: the official JSONL files ``<task>.jsonl`` with ``id``, ``context``, ``input``, ``answer``
(and ``options`` for the choice tasks). Prompts are cut in the middle to 128K tokens by default.
Scorers take the best over a sample's answers.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any

from omnikv_runtime.eval.data import EvalDataError, Sample, field_error, read_jsonl
from omnikv_runtime.eval.metrics import normalize_zh_answer, qa_f1_score, rouge_lsum_score, token_f1
from omnikv_runtime.eval.task import TaskSpec

DEFAULT_TRUNCATION = 128_000
_OPTIONS = "A. {OPTION_A}\nB. {OPTION_B}\nC. {OPTION_C}\nD. {OPTION_D}"

# task: (prompt template, max new tokens)
TASKS: dict[str, tuple[str, int]] = {
    "passkey": (
        "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz "
        "you about the important information there.\n\n{context}\n\n{input}\n\nThe pass key is",
        6,
    ),
    "number_string": (
        "There is an important info hidden inside a lot of irrelevant text. Find it. I will quiz you about the "
        "important information there.\n\n{context}\n\n{input}\n\nThe sequence of digits is",
        12,
    ),
    "kv_retrieval": (
        "Extract the value corresponding to the specified key in the JSON object below.\n\n{context}\n\n{input}",
        50,
    ),
    "longbook_sum_eng": ("Summarize the book below.\n\n{context}\n\nSummary:", 1200),
    "longbook_choice_eng": (
        f"Read the book and answer the question.\n\n{{context}}\n\nQuestion: {{question}}\n{_OPTIONS}\n\n"
        "The letter of the correct answer is",
        40,
    ),
    "longbook_qa_eng": (
        "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\nQuestion: {question}\n"
        "Answer:",
        40,
    ),
    "longbook_qa_chn": ("阅读以下书籍然后回答问题。\n\n{context}\n\n问题：{question}\n答案：", 40),
    "longdialogue_qa_eng": (
        'Below is a dialogue script where one random occurrence of a character name is replaced with "$$MASK$$", '
        "and you should try to guess who that character is.\n\n{context}\n\n"
        "The name that has been replaced with $$MASK$$ is likely",
        40,
    ),
    "math_find": ("{prefix}\n\n{context}\n\n{input}", 3),
    "math_calc": (
        "Let us calculate the intermediate values of an expression.\n\nExpression: 1 + 3 + 4\nValues: [1, 4, 8]\n\n"
        "Expression: 8 - 3 + 2 - 4\nValues: [8, 5, 7, 3]\n\nExpression: {context}\nValues:",
        30_000,
    ),
    "code_run": (
        "There is a function called {func} in the following Python code.\n\n{context}\n\n"
        "Please compute the exact value of {func_call}. The value of {func_call} is",
        5,
    ),
    "code_debug": (
        "Following is a Python code where exactly one of the functions/methods has a deliberate error that makes it "
        f"crash.\n\n{{context}}\n\nOptions:\n{_OPTIONS}\n\nThe correct option is:",
        5,
    ),
}
METRIC_NAMES = {
    "passkey": "first_int",
    "number_string": "first_int",
    "kv_retrieval": "word_match",
    "longbook_sum_eng": "rouge_lsum",
    "longbook_choice_eng": "choice",
    "longbook_qa_eng": "qa_f1",
    "longbook_qa_chn": "qa_f1_zh_char",
    "longdialogue_qa_eng": "word_match_upper",
    "math_find": "first_number",
    "math_calc": "prefix_match",
    "code_run": "last_int",
    "code_debug": "code_debug",
}
CHOICE_TASKS = ("longbook_choice_eng", "code_debug")
# the closing words of each template that start the answer (see TaskSpec.cue)
CUES = {
    "passkey": "The pass key is",
    "number_string": "The sequence of digits is",
    "longbook_sum_eng": "Summary:",
    "longbook_choice_eng": "The letter of the correct answer is",
    "longbook_qa_eng": "Answer:",
    "longbook_qa_chn": "答案：",
    "longdialogue_qa_eng": "The name that has been replaced with $$MASK$$ is likely",
    "math_calc": "Values:",
    "code_run": "The value of {func_call} is",
    "code_debug": "The correct option is:",
}
KV_CUE = "The value associated with the specified key is:"
ALL_TASKS = tuple(TASKS)


def first_int(text: str) -> str:
    """The first run of digits in ``text`` ('' if none)."""
    match = re.search(r"\d+", text)
    return match.group() if match else ""


def _words(text: str, separators: str) -> list[str]:
    for ch in separators:
        text = text.replace(ch, " ")
    return text.split()


def score_first_int(pred: str, label: Any) -> float:
    return float(first_int(pred) == str(label))


def score_word_match(pred: str, label: Any) -> float:
    return float(str(label) in _words(pred, "\n:\"'.,?!{}"))


def score_word_match_upper(pred: str, label: Any) -> float:
    return float(str(label) in [w.upper() for w in _words(pred, "\n:\"'.,?!{}")])


def score_last_int(pred: str, label: Any) -> float:
    words = _words(pred.strip(), "\n.`'\":")
    try:
        return float(bool(words) and int(words[-1]) == int(label))
    except ValueError:
        return 0.0


def score_first_number(pred: str, label: Any) -> float:
    match = re.search(r"\d+\.\d+|\d+", pred)
    if match is None:
        return 0.0
    if isinstance(label, int) and not isinstance(label, bool):
        return float(float(match.group()) == label and "." not in match.group())
    return float(float(match.group()) == float(label))


def score_prefix_match(pred: str, label: Any) -> float:
    """Share of the expected intermediate values that the prediction lists in order from the start."""
    values = [int(x) for x in re.findall(r"\d+", pred)]
    right = 0
    for want, got in zip(label, values):
        if want != got:
            break
        right += 1
    return right / len(label) if label else 0.0


def score_qa_f1_zh_char(pred: str, label: Any) -> float:
    """InfiniteBench's Chinese QA F1: one character is one token (no word segmentation)."""
    return token_f1(list(normalize_zh_answer(pred)), list(normalize_zh_answer(str(label))))


def _after_prefix(pred: str, prefixes: tuple[str, ...], accept: tuple[str, ...]) -> float | None:
    """Score the text after the first answer prefix found (None when there is none)."""
    for prefix in prefixes:
        index = pred.find(prefix)
        if index == -1:
            continue
        if len(pred) < index + len(prefix) + 1:
            return 0.0
        after = pred[index + len(prefix) + 1 :]
        return float(any(after.startswith(s) for s in accept))
    return None


def _squeeze(text: str, separators: tuple[str, ...]) -> str:
    for sep in separators:
        text = text.replace(sep, " ")
    return re.sub(" {2,}", " ", text)


def score_longbook_choice(pred: str, label: list[str]) -> float:
    """``label`` is ``[option text, letter]``: a leading letter, an answer prefix, then the first bare letter."""
    if pred[:1] and pred[0] in "ABCD":
        return float(pred[0] in label)
    pred = _squeeze(pred, ("\n", '"', "'", ".", ",", "?", "!", "{", "}"))
    found = _after_prefix(pred, ("answer is:", "answer:", "answer is", "option is"), tuple(label))
    if found is not None:
        return found
    for word in pred.split():
        if word in "ABCD":  # a substring test, as InfiniteBench writes it
            return float(word in label)
    return 0.0


def score_code_debug(pred: str, label: list[str]) -> float:
    """``label`` is ``[function name, letter]``: "B." / "B:" at the start, or the letter/name after a prefix."""
    name, letter = label
    if pred[:2] in (f"{letter}.", f"{letter}:"):
        return 1.0
    pred = _squeeze(pred.strip(), ("\n", "`", "'", '"', "-", "*", "Option", "option"))
    found = _after_prefix(pred, ("answer is:", "is:", "answer:"), (letter, name))
    return found or 0.0


_SCORERS = {
    "first_int": score_first_int,
    "word_match": score_word_match,
    "word_match_upper": score_word_match_upper,
    "rouge_lsum": lambda pred, label: rouge_lsum_score(pred, str(label)),
    "choice": score_longbook_choice,
    "code_debug": score_code_debug,
    "qa_f1": lambda pred, label: qa_f1_score(pred, str(label)),
    "qa_f1_zh_char": score_qa_f1_zh_char,
    "first_number": score_first_number,
    "prefix_match": score_prefix_match,
    "last_int": score_last_int,
}


def _answers(task: str, obj: dict[str, Any], path: Path, line: int) -> list[Any]:
    answer = obj["answer"]
    answers = answer if isinstance(answer, list) and task != "math_calc" else [answer]
    if task == "math_calc" and isinstance(answer, list) and answer and isinstance(answer[0], list):
        answers = answer
    if not answers:
        raise field_error(path, line, "answer", answer, "a non-empty answer (or list of answers)")
    if task in CHOICE_TASKS:
        options = obj.get("options")
        if not isinstance(options, list) or len(options) != 4:
            raise field_error(path, line, "options", options, "a list of the four options A-D")
        if len(answers) == 2 and answers[1] in ("A", "B", "C", "D"):
            return [list(answers)]
        if answers[0] not in options:
            raise field_error(path, line, "answer", answer, f"one of the options {options}")
        return [[answers[0], "ABCD"[options.index(answers[0])]]]
    return answers


def _fields(task: str, obj: dict[str, Any], path: Path, line: int) -> dict[str, str]:
    fields = {"context": str(obj["context"]), "input": str(obj["input"]), "question": str(obj["input"])}
    if task in CHOICE_TASKS:
        fields.update({f"OPTION_{letter}": str(text) for letter, text in zip("ABCD", obj["options"])})
    if task == "code_run":
        match = re.search(r"func_[0-9]+\(-?[0-9]+\)", fields["input"])
        if match is None:
            raise field_error(path, line, "input", obj["input"], "a question naming a call like func_12(-3)")
        fields["func_call"], fields["func"] = match.group(), match.group().split("(")[0]
    if task == "math_find":
        match = re.search(r"The \w+ number", fields["input"]) or re.search(r"The .+ of", fields["input"])
        target = match.group().lower().removesuffix(" of") if match else None
        fields["prefix"] = f"What is {target} in the following list?" if target else fields["input"]
    return fields


def _load(task: str, data_dir: Path | None, limit: int | None) -> list[Sample]:
    if data_dir is None:
        raise EvalDataError(f"InfiniteBench task {task!r} needs --data-dir with {task}.jsonl (see docs/evaluation.md)")
    path = Path(data_dir) / f"{task}.jsonl"
    samples = []
    for line, obj in read_jsonl(path, ("context", "input", "answer"), limit):
        sample_id = str(obj.get("id", f"line{line}"))
        samples.append(Sample(task, sample_id, _fields(task, obj, path, line), _answers(task, obj, path, line)))
    return samples


def _score(metric: str, prediction: str, sample: Sample) -> float:
    scorer = _SCORERS[metric]
    return max(scorer(prediction, answer) for answer in sample.answers)


def _cue(task: str, sample: Sample) -> str:
    if task == "kv_retrieval":  # the official inputs end with the cue themselves
        last = sample.fields["input"].rstrip().split("\n")[-1]
        return sample.fields["input"][sample.fields["input"].rfind(last) :] if last.startswith(KV_CUE) else ""
    return CUES.get(task, "").format(**sample.fields)


def task_spec(name: str, loader=None) -> TaskSpec:
    """The TaskSpec of an InfiniteBench task; ``loader`` replaces the file reader (synthetic data)."""
    template, max_new = TASKS[name]
    metric = METRIC_NAMES[name]
    return TaskSpec(
        name=name,
        benchmark="infinitebench",
        max_new_tokens=max_new,
        metric=metric,
        prompt=lambda sample: template.format(**sample.fields),
        score=partial(_score, metric),
        load=loader or partial(_load, name),
        cue=partial(_cue, name),
    )

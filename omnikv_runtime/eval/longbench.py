"""LongBench v1 (Bai et al., "LongBench: A Bilingual, Multitask Benchmark for Long Context
Understanding", ACL 2024): its 21 tasks and the 13 LongBench-E variants (``<task>_e``).

Data: the official JSONL files, one per task (``<task>.jsonl``, ``<task>_e.jsonl``), with the
fields ``input``, ``context``, ``answers``, ``all_classes``, ``length``, ``_id`` (see
docs/evaluation.md for where to get them). Prompt templates, generation lengths, metrics, the
tasks kept out of the chat template, the first-line rule for few-shot answers and samsum's
newline stop are LongBench's own.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from omnikv_runtime.eval.data import EvalDataError, Sample, field_error, read_jsonl, sample_id, text_field
from omnikv_runtime.eval.metrics import METRICS
from omnikv_runtime.eval.task import TaskSpec

_QA_MULTI = (
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nThe following are given passages.\n{context}\n\n"
    "Answer the question based on the given passages. Only give me the answer and do not output any other words."
    "\n\nQuestion: {input}\nAnswer:"
)
_QASPER_RULES = (
    "as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered "
    'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
    '"yes", "no", or "unanswerable". Do not provide any explanation.'
)
_NARRATIVE_RULES = "as concisely as you can, using a single phrase if possible. Do not provide any explanation."

# task: (prompt template, max new tokens, metric)
TASKS: dict[str, tuple[str, int, str]] = {
    "narrativeqa": (
        "You are given a story, which can be either a novel or a movie script, and a question. Answer the question "
        f"{_NARRATIVE_RULES}\n\nStory: {{context}}\n\nNow, answer the question based on the story "
        f"{_NARRATIVE_RULES}\n\nQuestion: {{input}}\n\nAnswer:",
        128,
        "qa_f1",
    ),
    "qasper": (
        f"You are given a scientific article and a question. Answer the question {_QASPER_RULES}\n\n"
        f"Article: {{context}}\n\n Answer the question based on the above article {_QASPER_RULES}\n\n"
        "Question: {input}\n\nAnswer:",
        128,
        "qa_f1",
    ),
    "multifieldqa_en": (
        "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question based on the "
        "above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
        64,
        "qa_f1",
    ),
    "multifieldqa_zh": (
        "阅读以下文字并用中文简短回答：\n\n{context}\n\n现在请基于上面的文章回答下面的问题，只告诉我答案，不要输出任何其他字词。"
        "\n\n问题：{input}\n回答：",
        64,
        "qa_f1_zh",
    ),
    "hotpotqa": (_QA_MULTI, 32, "qa_f1"),
    "2wikimqa": (_QA_MULTI, 32, "qa_f1"),
    "musique": (_QA_MULTI, 32, "qa_f1"),
    "dureader": (
        "请基于给定的文章回答下述问题。\n\n文章：{context}\n\n请基于上述文章回答下面的问题。\n\n问题：{input}\n回答：",
        128,
        "rouge_l_zh",
    ),
    "gov_report": (
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
        "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
        512,
        "rouge_l",
    ),
    "qmsum": (
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
        "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting "
        "transcript in one or more sentences.\n\nQuery: {input}\nAnswer:",
        512,
        "rouge_l",
    ),
    "multi_news": (
        "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
        "Now, write a one-page summary of all the news.\n\nSummary:",
        512,
        "rouge_l",
    ),
    "vcsum": (
        "下面有一段会议记录，请你阅读后，写一段总结，总结会议的内容。\n会议记录：\n{context}\n\n会议总结：",
        512,
        "rouge_l_zh",
    ),
    "trec": (
        "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
        64,
        "classification",
    ),
    "triviaqa": (
        "Answer the question based on the given passage. Only give me the answer and do not output any other words. "
        "The following are some examples.\n\n{context}\n\n{input}",
        32,
        "qa_f1",
    ),
    "samsum": (
        "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
        128,
        "rouge_l",
    ),
    "lsht": ("请判断给定新闻的类别，下面是一些例子。\n\n{context}\n{input}", 64, "classification"),
    "passage_count": (
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
        "count of unique paragraphs after removing duplicates. The output format should only contain the number, "
        "such as 1, 2, 3, and so on.\n\nThe final answer is: ",
        32,
        "count",
    ),
    "passage_retrieval_en": (
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of "
        'the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", '
        "etc.\n\nThe answer is: ",
        32,
        "retrieval",
    ),
    "passage_retrieval_zh": (
        "以下是若干段落文字，以及其中一个段落的摘要。请确定给定的摘要出自哪一段。\n\n{context}\n\n下面是一个摘要\n\n{input}\n\n"
        '请输入摘要所属段落的编号。答案格式必须是"段落1"，"段落2"等格式\n\n答案是：',
        32,
        "retrieval_zh",
    ),
    "lcc": ("Please complete the code given below. \n{context}Next line of code:\n", 64, "code_sim"),
    "repobench-p": ("Please complete the code given below. \n{context}{input}Next line of code:\n", 64, "code_sim"),
}

E_TASKS = (
    "qasper",
    "multifieldqa_en",
    "hotpotqa",
    "2wikimqa",
    "gov_report",
    "multi_news",
    "trec",
    "triviaqa",
    "samsum",
    "passage_count",
    "passage_retrieval_en",
    "lcc",
    "repobench-p",
)
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lsht", "lcc", "repobench-p"})
FIRST_LINE_ONLY = frozenset({"trec", "triviaqa", "samsum", "lsht"})
REQUIRED = ("input", "context", "answers")
ALL_TASKS = (*TASKS, *(f"{t}_e" for t in E_TASKS))


def _load(task: str, data_dir: Path | None, limit: int | None) -> list[Sample]:
    if data_dir is None:
        raise EvalDataError(f"LongBench task {task!r} needs --data-dir with {task}.jsonl (see docs/evaluation.md)")
    path = Path(data_dir) / f"{task}.jsonl"
    samples = []
    seen: dict[str, int] = {}
    for line, obj in read_jsonl(path, REQUIRED, limit):
        fields = {name: text_field(path, line, obj, name) for name in ("context", "input")}
        answers = obj["answers"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
            raise field_error(path, line, "answers", answers, "a non-empty list of reference answers (strings)")
        classes = obj.get("all_classes") or []
        if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
            raise field_error(path, line, "all_classes", classes, "a list of class names (strings) or null")
        length = obj.get("length")
        if task.endswith("_e") and (isinstance(length, bool) or not isinstance(length, int) or length < 0):
            raise field_error(path, line, "length", length, "the context's length in words, a whole number >= 0")
        extra = {"all_classes": classes, "length": length if isinstance(length, int) else None}
        samples.append(Sample(task, sample_id(path, line, obj, "_id", seen), fields, answers, extra))
    return samples


def _score(base: str, prediction: str, sample: Sample) -> float:
    metric = METRICS[TASKS[base][2]]
    if base in FIRST_LINE_ONLY:
        prediction = prediction.lstrip("\n").split("\n")[0]
    classes = sample.extra.get("all_classes") or []
    return max(metric(prediction, answer, all_classes=classes) for answer in sample.answers)


def _prompt(template: str, sample: Sample) -> str:
    return template.format(**sample.fields)


def task_spec(name: str) -> TaskSpec:
    """The TaskSpec of a LongBench task (``narrativeqa`` ... or a LongBench-E ``<task>_e``)."""
    base = name.removesuffix("_e") if name.endswith("_e") and name.removesuffix("_e") in E_TASKS else name
    template, max_new, metric = TASKS[base]
    return TaskSpec(
        name=name,
        benchmark="longbench",
        max_new_tokens=max_new,
        metric=metric,
        prompt=partial(_prompt, template),
        score=partial(_score, base),
        load=partial(_load, name),
        chat=base not in NO_CHAT,
        stop_at_newline=base == "samsum",
        length_buckets=name != base,
    )

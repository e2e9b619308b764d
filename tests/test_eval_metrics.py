"""The benchmark metrics against hand-computed values (English and Chinese), and the task tables."""

from __future__ import annotations

import pytest

from omnikv_runtime.eval import infinitebench as ib
from omnikv_runtime.eval import longbench as lb
from omnikv_runtime.eval import metrics as m
from omnikv_runtime.eval.data import Sample

pytest.importorskip("jieba")


def test_normalize_answer_drops_case_punctuation_articles():
    assert m.normalize_answer("The  Cat, sat!") == "cat sat"
    assert m.normalize_zh_answer("望月 桥。ABC！") == "望月桥abc"


def test_qa_f1_by_hand():
    # pred tokens cat sat on mat, truth cat on mat: overlap 3, P 3/4, R 1 -> F1 6/7
    assert m.qa_f1_score("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert m.qa_f1_score("Mara Quill.", "mara quill") == 1.0
    assert m.qa_f1_score("dog", "cat") == 0.0


def test_qa_f1_zh_by_hand():
    # jieba: 我/来到/北京/清华大学/。 vs 他/来到/了/网易/杭研/大厦: overlap 1, P 1/4, R 1/6 -> F1 0.2
    assert m.segment_zh("我来到北京清华大学") == ["我", "来到", "北京", "清华大学"]
    assert m.qa_f1_zh_score("我来到北京清华大学。", "他来到了网易杭研大厦") == pytest.approx(0.2)
    assert m.qa_f1_zh_score("望月桥", "望月桥") == 1.0


def test_rouge_l_is_the_rouge_packages_summary_level_f():
    # one sentence each; distinct words 5 and 5; LCS the cat on the mat -> distinct {the,cat,on,mat} = 4
    assert m.rouge_l_score("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8)
    # sentences split on '.': union of per-sentence LCS words covers all four words -> 1.0
    assert m.rouge_l_score("a b. c d", "a c. b d") == pytest.approx(1.0)
    assert m.rouge_l_score("The cat", "the cat") == pytest.approx(0.5)  # case is kept
    assert m.rouge_l_score("", "the cat") == 0.0
    assert m.rouge_l_score("...", "the cat") == 0.0


def test_rouge_zh_by_hand():
    # 我/来到/北京/清华大学 vs 我/来到/北京: LCS 3, P 3/4, R 1 -> 6/7
    assert m.rouge_zh_score("我来到北京清华大学", "我来到北京") == pytest.approx(6 / 7)


def test_rouge_lsum_by_hand():
    # pred sentences [the cat sat] [it purred] (5 tokens), ref [the cat sat down] (4): 3 hits -> P .6, R .75
    assert m.rouge_lsum_score("The cat sat.\nIt purred.", "the cat sat down") == pytest.approx(2 / 3)
    # clipping: ref a / a (2 tokens), pred a a a (3): 2 hits -> P 2/3, R 1 -> 0.8
    assert m.rouge_lsum_score("a a a", "a\na") == pytest.approx(0.8)
    assert m.rouge_lsum_score("", "a") == 0.0


def test_classification_retrieval_count():
    classes = ["Individual", "City", "Number of something", "Date"]
    assert m.classification_score("Individual", "Individual", all_classes=classes) == 1.0
    assert m.classification_score("City or Individual", "Individual", all_classes=classes) == 0.5
    assert m.classification_score("Date", "Individual", all_classes=classes) == 0.0
    nested = ["Number", "Number of something"]  # a class inside the truth is not counted against it
    assert m.classification_score("Number of something", "Number of something", all_classes=nested) == 1.0
    assert m.retrieval_score("Paragraph 2", "Paragraph 2") == 1.0
    assert m.retrieval_score("Paragraph 2 or Paragraph 12", "Paragraph 2") == 0.5
    assert m.retrieval_score("no idea", "Paragraph 2") == 0.0
    assert m.retrieval_zh_score("答案是段落3和段落4", "段落3") == 0.5
    assert m.count_score("There are 2 unique paragraphs out of 3", "2") == 0.5
    assert m.count_score("two", "2") == 0.0


def test_code_sim_first_code_line_and_fuzz_ratio():
    assert m.fuzz_ratio("abcd", "abce") == 75  # difflib: 2 * 3 / 8
    assert m.code_sim_score("```python\n    return a * b\n```", "    return a * b") == 1.0
    assert m.code_sim_score("# comment\nabcd", "abce") == 0.75
    assert m.code_sim_score("", "x = 1") == 0.0


def test_infinitebench_scorers_by_hand():
    assert ib.score_first_int(" 52817.", "52817") == 1.0
    assert ib.score_first_int("The key is 5281 7", "52817") == 0.0
    assert ib.score_word_match('The value is "abc-123".', "abc-123") == 1.0
    assert ib.score_word_match_upper("Probably John.", "JOHN") == 1.0
    assert ib.score_last_int("The value is 14", 14) == 1.0
    assert ib.score_last_int("14 or 15", 14) == 0.0
    assert ib.score_first_number("The answer is 3.5", 3.5) == 1.0
    assert ib.score_first_number("7", 7) == 1.0
    assert ib.score_prefix_match("[1, 4, 9]", [1, 4, 8]) == pytest.approx(2 / 3)
    label = ["Bread and a lamp", "B"]
    assert ib.score_longbook_choice("B", label) == 1.0
    assert ib.score_longbook_choice(" B.", label) == 1.0
    assert ib.score_longbook_choice("The answer is: B", label) == 1.0
    assert ib.score_longbook_choice("The answer is C", label) == 0.0
    assert ib.score_code_debug("C.", ["func_x", "C"]) == 1.0
    assert ib.score_code_debug("The answer is: func_x", ["func_x", "C"]) == 1.0
    assert ib.score_code_debug("I think A", ["func_x", "C"]) == 0.0
    assert ib.score_qa_f1_zh_char("望月桥。", "望月桥") == 1.0
    assert ib.score_qa_f1_zh_char("望月", "望月桥") == pytest.approx(0.8)  # P 1, R 2/3


def test_longbench_table_and_task_rules():
    assert len(lb.TASKS) == 21 and len(lb.E_TASKS) == 13 and len(lb.ALL_TASKS) == 34
    lengths = {name: lb.TASKS[name][1] for name in ("narrativeqa", "gov_report", "trec", "samsum", "lcc", "musique")}
    assert lengths == {"narrativeqa": 128, "gov_report": 512, "trec": 64, "samsum": 128, "lcc": 64, "musique": 32}
    trec = lb.task_spec("trec")
    assert not trec.chat and not lb.task_spec("trec_e").chat and lb.task_spec("hotpotqa").chat
    sample = Sample(
        "trec", "x", {"context": "C", "input": "Q"}, ["Individual"], {"all_classes": ["Individual", "City"]}
    )
    assert trec.prompt(sample).endswith("examples of questions.\n\nC\nQ")
    assert trec.score("Individual\nCity", sample) == 1.0  # only the first line counts for few-shot tasks
    assert lb.task_spec("samsum").stop_at_newline and lb.task_spec("qasper_e").length_buckets
    assert len(ib.ALL_TASKS) == 12 and ib.TASKS["kv_retrieval"][1] == 50 and ib.TASKS["longbook_sum_eng"][1] == 1200


def test_jieba_missing_is_a_clear_error(monkeypatch):
    import builtins

    m._jieba.cache_clear()
    real_import = builtins.__import__

    def no_jieba(name, *args, **kwargs):
        if name == "jieba":
            raise ImportError("no jieba")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_jieba)
    with pytest.raises(m.MissingDependencyError, match="pip install jieba"):
        m.qa_f1_zh_score("我", "我")
    monkeypatch.undo()
    m._jieba.cache_clear()

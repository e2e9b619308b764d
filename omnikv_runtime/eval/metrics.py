"""Scoring functions of LongBench (Bai et al., ACL 2024) and InfiniteBench (Zhang et al., ACL 2024).

Every function takes one prediction and one ground truth and returns a float in [0, 1]; the task
tables (``longbench.py``, ``infinitebench.py``) take the maximum over a sample's answers and report
the mean x 100, as the benchmarks do. Behaviour follows the benchmarks' own scorers, including
their quirks (noted where they matter):

- ``qa_f1_score``: SQuAD-style normalisation (lower case, drop punctuation and the articles
  a/an/the, collapse spaces), then token F1 over whitespace tokens.
- ``qa_f1_zh_score``: jieba word segmentation, Chinese+ASCII punctuation removed per token.
- ``rouge_l_score``: ROUGE-L F of the ``rouge`` package (pltrdy) that LongBench calls: sentences
  split on ".", case kept, summary-level union LCS over *distinct* words, F1 = 2PR/(P+R).
  Implemented here (no dependency). ``rouge_zh_score``: the same on jieba-segmented text.
- ``rouge_lsum_score``: rougeLsum of Google's ``rouge_score`` (what InfiniteBench's
  ``evaluate.load("rouge")`` reports): lower-cased alphanumeric tokens, sentences split on
  newlines, summary-level union LCS with token-count clipping, no stemming.
- ``code_sim_score``: fuzzywuzzy's ``fuzz.ratio`` on its pure-Python path (``difflib``
  SequenceMatcher ratio, rounded to a whole percent) on the first non-comment line.
- ``classification_score``, ``retrieval_score``, ``retrieval_zh_score``, ``count_score``: as
  LongBench defines them.
"""

from __future__ import annotations

import difflib
import functools
import re
import string
from collections import Counter
from collections.abc import Sequence

from omnikv_runtime.errors import OmniKVError

_ZH_PUNCTUATION = (
    "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣"
    "､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏."
)
_EN_PUNCT = frozenset(string.punctuation)
_ALL_PUNCT = frozenset(string.punctuation + _ZH_PUNCTUATION)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


class MissingDependencyError(OmniKVError, ImportError):
    """An optional package the Chinese metrics need is not installed."""


@functools.cache
def _jieba():
    try:
        import jieba
    except ImportError:
        raise MissingDependencyError(
            "the Chinese metrics (qa_f1_zh, rouge_zh) need jieba for word segmentation: "
            "pip install jieba (or pip install 'omnikv-runtime[eval]')"
        ) from None
    jieba.setLogLevel(60)  # silence its "Building prefix dict" chatter
    return jieba


def segment_zh(text: str) -> list[str]:
    """jieba's precise-mode segmentation (``cut_all=False``), as both benchmarks use."""
    return list(_jieba().cut(text, cut_all=False))


def normalize_answer(text: str) -> str:
    """Lower case, remove ASCII punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Lower case, remove Chinese and ASCII punctuation, remove all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ALL_PUNCT).split())


def token_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """F1 of the multiset overlap of two token lists (0 when nothing overlaps)."""
    same = sum((Counter(prediction) & Counter(ground_truth)).values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_: object) -> float:
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    def tokens(text: str) -> list[str]:
        return [t for t in (normalize_zh_answer(w) for w in segment_zh(text)) if t]

    return token_f1(tokens(prediction), tokens(ground_truth))


def _lcs_table(x: Sequence[str], y: Sequence[str]) -> list[list[int]]:
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i in range(1, len(x) + 1):
        row, prev, xi = table[i], table[i - 1], x[i - 1]
        for j in range(1, len(y) + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    return table


def _lcs_words(ref: Sequence[str], hyp: Sequence[str]) -> list[str]:
    """One LCS of ``ref`` and ``hyp``: back-tracking prefers dropping a hypothesis word on ties."""
    table = _lcs_table(ref, hyp)
    i, j, out = len(ref), len(hyp), []
    while i and j:
        if ref[i - 1] == hyp[j - 1]:
            out.append(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def rouge_l_score(prediction: str, ground_truth: str, **_: object) -> float:
    """ROUGE-L F as LongBench computes it (``rouge`` package, summary level); 0 for an empty side."""

    def sentences(text: str) -> list[list[str]]:
        return [" ".join(s.split()).split(" ") for s in text.split(".") if s]

    hyp, ref = sentences(prediction), sentences(ground_truth)
    if not hyp or not ref:
        return 0.0  # the package raises "Hypothesis is empty"; LongBench scores that 0
    m = len({w for s in ref for w in s})
    n = len({w for s in hyp for w in s})
    union: set[str] = set()
    for ref_sentence in ref:
        for hyp_sentence in hyp:
            union.update(_lcs_words(ref_sentence, hyp_sentence))
    hits = len(union)
    recall, precision = hits / m, hits / n
    return 2.0 * precision * recall / (precision + recall + 1e-8)


def rouge_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    return rouge_l_score(" ".join(segment_zh(prediction)), " ".join(segment_zh(ground_truth)))


def _rouge_tokens(text: str) -> list[str]:
    return [t for t in re.split(r"\s+", re.sub(r"[^a-z0-9]+", " ", text.lower())) if t]


def _lcs_indices(ref: Sequence[str], hyp: Sequence[str]) -> list[int]:
    table = _lcs_table(ref, hyp)
    i, j, out = len(ref), len(hyp), []
    while i and j:
        if ref[i - 1] == hyp[j - 1]:
            out.append(i - 1)
            i, j = i - 1, j - 1
        elif table[i][j - 1] > table[i - 1][j]:
            j -= 1
        else:
            i -= 1
    return out


def rouge_lsum_score(prediction: str, ground_truth: str, **_: object) -> float:
    """rougeLsum F (Google ``rouge_score``, no stemmer): newline-split sentences, clipped union LCS."""
    ref = [_rouge_tokens(s) for s in ground_truth.split("\n") if s]
    hyp = [_rouge_tokens(s) for s in prediction.split("\n") if s]
    m, n = sum(map(len, ref)), sum(map(len, hyp))
    if not m or not n:
        return 0.0
    ref_counts = Counter(t for s in ref for t in s)
    hyp_counts = Counter(t for s in hyp for t in s)
    hits = 0
    for sentence in ref:
        union = sorted({i for h in hyp for i in _lcs_indices(sentence, h)})
        for token in (sentence[i] for i in union):
            if ref_counts[token] > 0 and hyp_counts[token] > 0:
                hits += 1
                ref_counts[token] -= 1
                hyp_counts[token] -= 1
    recall, precision = hits / m, hits / n
    return 0.0 if hits == 0 else 2 * precision * recall / (precision + recall)


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] = (), **_: object) -> float:
    """1/k when the ground truth is among the k class names found in the prediction, else 0.

    A class name that is a proper substring of the ground truth is not counted against it.
    (LongBench removes those while iterating over the same list, which can skip the next name;
    here every such name is removed. Its difflib fallback for "no class found" never runs, as its
    guard compares a list with 0, so finding no class scores 0 in both.)
    """
    found = [name for name in all_classes if name in prediction]
    found = [name for name in found if not (name in ground_truth and name != ground_truth)]
    return 1.0 / len(found) if ground_truth in found else 0.0


def _share_of_numbers(prediction: str, wanted: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(number == wanted for number in numbers) / len(numbers) if numbers else 0.0


def count_score(prediction: str, ground_truth: str | int, **_: object) -> float:
    """Share of the numbers in the prediction that equal the ground truth."""
    return _share_of_numbers(prediction, str(ground_truth))


def _retrieval(prediction: str, ground_truth: str, pattern: str) -> float:
    match = re.search(pattern, ground_truth)
    if match is None:
        raise ValueError(f"ground truth {ground_truth!r} does not name a paragraph (pattern {pattern!r})")
    return _share_of_numbers(prediction, match.group(1))


def retrieval_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Share of the numbers in the prediction equal to N of the ground truth's "Paragraph N"."""
    return _retrieval(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, **_: object) -> float:
    """As :func:`retrieval_score` for "段落N"."""
    return _retrieval(prediction, ground_truth, r"段落(\d+)")


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy ``fuzz.ratio`` without python-Levenshtein: difflib ratio x 100, rounded."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def code_sim_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Edit similarity of the first prediction line without a backtick, '#' or '//' to the answer."""
    line = next(
        (ln for ln in prediction.lstrip("\n").split("\n") if "`" not in ln and "#" not in ln and "//" not in ln), ""
    )
    return fuzz_ratio(line, ground_truth) / 100


METRICS = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge_l": rouge_l_score,
    "rouge_l_zh": rouge_zh_score,
    "rouge_lsum": rouge_lsum_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}

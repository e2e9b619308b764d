"""Seeded long-context passkey retrieval task (needle in a haystack of filler text)."""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

INTRO = (
    "There is an important pass key hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will ask you about the pass key later."
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the 5-digit number only."

# Short, number-free, low-information sentences: the tiny bundled model retrieves the needle more
# reliably from a small repetitive vocabulary (dense SmolLM2-135M: 12/12 at 3K tokens with these five,
# 11/12 with a ten-sentence mix).
FILLER_SENTENCES: tuple[str, ...] = (
    "The sea is calm.",
    "The grass is soft.",
    "The night is dark.",
    "Off we go.",
    "Round and round we go.",
)

_NUMBER = re.compile(r"\d(?:[\d,]*\d)?")


def _render(
    tokenizer: PreTrainedTokenizerBase, filler: list[str], n_filler: int, depth: float, key: str, chat: bool
) -> str:
    body = filler[:n_filler]
    body.insert(round(depth * n_filler), NEEDLE.format(key=key))
    user = f"{INTRO}\n\n{' '.join(body)}\n\n{QUESTION}"
    if not chat:
        return f"{user}\nThe pass key is"
    messages = [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _count_tokens(tokenizer: PreTrainedTokenizerBase, text: str, chat: bool) -> int:
    # A chat-templated prompt already carries its special tokens: count it the way it is encoded.
    return len(tokenizer(text, add_special_tokens=not chat)["input_ids"])


def build_passkey_prompt(
    tokenizer: PreTrainedTokenizerBase,
    target_tokens: int,
    depth: float,
    passkey: str | None = None,
    seed: int = 0,
    use_chat_template: bool = True,
) -> tuple[str, str]:
    """Build a prompt of about ``target_tokens`` tokens hiding a passkey at relative ``depth`` (0..1).

    Returns ``(prompt, passkey)``. The passkey is a seeded random 5-digit number unless given; the
    filler sentences are drawn with the same seed. The prompt never exceeds ``target_tokens`` tokens
    (encoded with ``add_special_tokens=False`` when chat-templated, with them otherwise) unless the fixed
    parts alone are longer. With ``use_chat_template`` the prompt ends with the assistant turn opener;
    without it, with ``"The pass key is"`` for the model to complete.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    rng = random.Random(seed)
    key = passkey if passkey is not None else str(rng.randint(10000, 99999))

    def render(filler: list[str], n: int) -> str:
        return _render(tokenizer, filler, n, depth, key, use_chat_template)

    prompt = _fit(tokenizer, target_tokens, rng, render, use_chat_template)
    return prompt, key


def _fit(
    tokenizer: PreTrainedTokenizerBase,
    target_tokens: int,
    rng: random.Random,
    render: Callable[[list[str], int], str],
    chat: bool,
) -> str:
    """The longest ``render(filler, n)`` of at most `target_tokens` tokens; filler sentences drawn from `rng`."""
    filler: list[str] = []

    def size(n: int) -> int:
        while len(filler) < n:
            filler.append(rng.choice(FILLER_SENTENCES))
        return _count_tokens(tokenizer, render(filler, n), chat)

    cap = 16
    while size(cap) <= target_tokens:  # grow an upper bound, then binary-search below it
        cap *= 2
    lo, hi = 0, cap - 1  # largest n with size(n) <= target_tokens
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if size(mid) <= target_tokens:
            lo = mid
        else:
            hi = mid - 1
    logger.debug("prompt: %d filler sentences, %d tokens (target %d)", lo, size(lo), target_tokens)
    return render(filler, lo)


MULTI_INTRO = (
    "There are several important pass keys hidden inside a lot of irrelevant text, each kept in a box "
    "of its own colour. Find them and memorize them. I will ask you about one of them later."
)
MULTI_NEEDLE = "The pass key of the {colour} box is {key}. Remember it. {key} is the pass key of the {colour} box."
MULTI_QUESTION = "What is the pass key of the {colour} box? Answer with the 5-digit number only."
COLOURS: tuple[str, ...] = ("red", "blue", "green", "yellow", "purple", "orange")


def build_multi_needle_prompt(
    tokenizer: PreTrainedTokenizerBase,
    target_tokens: int,
    needles: int,
    seed: int = 0,
    use_chat_template: bool = True,
) -> tuple[str, str, list[str]]:
    """A prompt of about ``target_tokens`` tokens with `needles` passkeys in coloured boxes; one is asked for.

    Returns ``(prompt, asked_key, all_keys)``. Needles sit at evenly spread depths (1/(n+1), 2/(n+1),
    ...); the colours, keys (distinct seeded 5-digit numbers) and which one is asked follow `seed`. The
    other needles are distractors: answering with one of them is wrong.
    """
    if not 1 <= needles <= len(COLOURS):
        raise ValueError(f"needles must be in 1..{len(COLOURS)}, got {needles}")
    rng = random.Random(seed)
    colours = rng.sample(COLOURS, needles)
    keys = [str(k) for k in rng.sample(range(10000, 100000), needles)]
    asked = rng.randrange(needles)

    def render(filler: list[str], n: int) -> str:
        body = filler[:n]
        for i in reversed(range(needles)):  # from the deepest so earlier insertions keep their place
            body.insert(round((i + 1) / (needles + 1) * n), MULTI_NEEDLE.format(colour=colours[i], key=keys[i]))
        user = f"{MULTI_INTRO}\n\n{' '.join(body)}\n\n{MULTI_QUESTION.format(colour=colours[asked])}"
        if not use_chat_template:
            return f"{user}\nThe pass key of the {colours[asked]} box is"
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )

    return _fit(tokenizer, target_tokens, rng, render, use_chat_template), keys[asked], keys


def extract_answer(text: str) -> str | None:
    """Return the first number of 4+ digits in ``text`` (thousands separators removed), else ``None``."""
    for match in _NUMBER.finditer(text):
        digits = match.group().replace(",", "")
        if len(digits) >= 4:
            return digits
    return None


def passkey_found(generated_text: str, passkey: str) -> bool:
    """Whether the first number in the generated text is the passkey."""
    return extract_answer(generated_text) == passkey.strip()

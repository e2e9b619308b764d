"""Request text to token ids, refusing a prompt that cannot fit before the work grows with it.

The checks run cheapest first:

1. **By characters.** No token covers more characters than the longest entry of the tokenizer's
   vocabulary (byte-level BPE entries hold one character per byte, SentencePiece entries one per
   character), so a text with more than ``room × longest`` characters besides whitespace has more
   than ``room`` tokens: it is refused without tokenizing. Whitespace is not counted, as tokenizers
   may drop or merge it (a word-level pre-tokenizer, SentencePiece's collapsed spaces). Word-level
   and WordPiece vocabularies map an unknown word of any length to one token, so for them this
   check is skipped. (A chat request with more messages than the context has
   tokens is refused before that, as its body is parsed: each message renders to at least one token.)
2. **By prefix.** A long text is counted on growing prefixes, each cut before a space. Tokens do not
   span such a cut in the vocabularies served here, so a prefix has about as many tokens as the
   same stretch of the whole text; one more than ``room + PREFIX_SLACK`` tokens refuses the
   request without tokenizing the rest.
3. The whole text is tokenized.

:class:`PromptWorker` runs all of it (and the JSON parsing before it) on one worker thread, off the
event loop, so a large body never stalls the other requests or ``/health``; concurrent requests
queue for that one thread instead of taking every core from the decode steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from omnikv_runtime.serve.schemas import ApiError

FIRST_PREFIX_CHARS_PER_TOKEN = 4  # where the first prefix is cut: about `room` tokens of English text
PREFIX_SLACK = 16  # tokens a prefix may have beyond the room before it alone refuses the request
_T = TypeVar("_T")


WHOLE_WORD_MODELS = ("WordLevel", "WordPiece")  # an unknown word of any length is one token of theirs


def longest_token_chars(tokenizer: Any) -> int | None:
    """Characters of the tokenizer's longest vocabulary entry (None when it has no ``get_vocab``, or when its
    model turns an unknown word of any length into one token)."""
    get_vocab = getattr(tokenizer, "get_vocab", None)
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    if get_vocab is None or type(model).__name__ in WHOLE_WORD_MODELS:
        return None
    return max((len(entry) for entry in get_vocab()), default=None)


def too_long(room: int, why: str, limit: int, max_tokens: int | None, param: str) -> ApiError:
    """The 400 ``context_length_exceeded`` of a prompt found (``why``) to have more than ``room`` tokens."""
    new = "the reply needs at least 1" if max_tokens is None else f"max_tokens is {max_tokens}"
    return ApiError(
        400,
        f"the prompt has more than {max(room, 0)} tokens ({why}) and {new}: over this server's context of "
        f"{limit} tokens; shorten the prompt or lower max_tokens",
        param,
        "context_length_exceeded",
    )


def _cut_before_space(text: str, cut: int) -> int | None:
    """The last index in ``[cut // 2, cut]`` that holds a whitespace character after a non-whitespace
    one (None when there is none)."""
    for end in range(min(cut, len(text) - 1), cut // 2, -1):
        if text[end].isspace() and not text[end - 1].isspace():
            return end
    return None


class PromptEncoder:
    """Token ids of a request's text for a server of ``context_limit`` tokens (see the module docstring)."""

    def __init__(self, tokenizer: Any, context_limit: int) -> None:
        self.tokenizer = tokenizer
        self.context_limit = context_limit
        self.longest_token = longest_token_chars(tokenizer)

    def room(self, max_tokens: int | None) -> int:
        """Prompt tokens that fit beside ``max_tokens`` new ones (None: at least one)."""
        return self.context_limit - (1 if max_tokens is None else max_tokens)

    def check_chars(self, texts: list[str], max_tokens: int | None, param: str) -> None:
        """Refuse ``texts`` whose characters besides whitespace hold more tokens than the room, whatever they are."""
        room = self.room(max_tokens)
        if self.longest_token is None:
            return
        chars = sum(len(text) - sum(map(text.count, " \n\t\r")) for text in texts)  # counted in C, not per char
        if chars > max(room, 0) * self.longest_token:
            why = f"{chars} characters besides whitespace, and no token is longer than {self.longest_token}"
            raise too_long(room, why, self.context_limit, max_tokens, param)

    def encode(self, text: str, add_special_tokens: bool, max_tokens: int | None, param: str) -> tuple[int, ...]:
        """The ids of ``text``; raises ApiError 400 when they cannot fit (possibly before counting them all)."""
        self.check_chars([text], max_tokens, param)
        room = self.room(max_tokens)
        cut = max(room, 1) * FIRST_PREFIX_CHARS_PER_TOKEN
        while cut < len(text):
            end = _cut_before_space(text, cut)
            if end is None:  # no place to cut without splitting a token: look further on
                cut *= 2
                continue
            count = len(self._ids(text[:end], add_special_tokens))
            if count > room + PREFIX_SLACK:
                why = f"its first {end} characters alone have {count}"
                raise too_long(room, why, self.context_limit, max_tokens, param)
            passing = int(end / max(count, 1) * (room + PREFIX_SLACK + 1) * 1.25)  # where the count should pass
            cut = max(2 * cut, passing)
        ids = self._ids(text, add_special_tokens)
        if not ids:
            raise ApiError(400, f"'{param}' gives no tokens", param, "empty_prompt")
        return ids

    def _ids(self, text: str, add_special_tokens: bool) -> tuple[int, ...]:
        encoded = self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return tuple(int(each) for each in encoded)


class PromptWorker:
    """One thread for the work that grows with a request body (parsing, rendering, tokenizing)."""

    def __init__(self) -> None:
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="omnikv-prompts")

    async def run(self, work: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self.pool, work, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

"""A request's text as its tokens arrive: incremental decoding with stop strings.

Text is handed out as soon as it is final. Two things hold it back: a token that ends inside a
multi-byte character (the tokenizer shows U+FFFD until the character completes), and a tail
that could be the beginning of a stop string. When a stop string appears, the text ends just
before it. When the request ends with a character still incomplete (``max_tokens`` reached, or
the end-of-sequence token), that character is left out: it never came.
"""

from __future__ import annotations

from typing import Any

_INCOMPLETE = "\ufffd"


class TextStream:
    """Decodes one request's new tokens; :meth:`add` returns the text that became final."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0  # characters handed out
        self.stopped = False

    def _text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> tuple[str, bool]:
        """Take ``token``; returns the newly final text and whether a stop string ended the text."""
        self.ids.append(token)
        text = self._text()
        if self.stop:
            reach = max(len(s) for s in self.stop)
            start = max(0, self.sent - reach)
            found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
            if found:
                end = max(min(found), self.sent)
                out, self.sent, self.stopped = text[self.sent : end], end, True
                return out, True
        safe = len(text)
        while safe > self.sent and text[safe - 1] == _INCOMPLETE:
            safe -= 1
        for held in range(min(max((len(s) for s in self.stop), default=1) - 1, safe - self.sent), 0, -1):
            if any(s.startswith(text[safe - held : safe]) for s in self.stop):
                safe -= held
                break
        out = text[self.sent : safe]
        self.sent = max(self.sent, safe)
        return out, False

    def finish(self) -> str:
        """The text still held back, when the request ends for another reason than a stop string, less
        a character left incomplete at the end."""
        if self.stopped:
            return ""
        text = self._text().rstrip(_INCOMPLETE)
        out = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return out


def eos_token_ids(engine: Any) -> list[int]:
    """The token ids that end a request: the model's generation config's, else the tokenizer's."""
    config = engine.model.generation_config
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = engine.tokenizer.eos_token_id
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])] if eos is not None else []

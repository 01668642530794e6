"""A sequence's text as its tokens arrive: what can be sent now, and where a stop string ends it."""
from __future__ import annotations


class TextStream:
    """Decodes the tokens so far and hands out only text that is final: no half UTF-8 character (decoded as
    U+FFFD) and no tail that could still grow into a stop string. A stop string ends the text before it."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0                 # characters handed out
        self.text = ""

    def add(self, token: int) -> tuple[str, bool]:
        """-> (new final text, whether a stop string was reached)."""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = text[:min(hits)]
            return self._take(len(self.text)), True
        self.text = text
        end = len(text.rstrip("\ufffd"))
        hold = max((n for s in self.stops for n in range(1, len(s)) if text[:end].endswith(s[:n])), default=0)
        return self._take(end - hold), False

    def flush(self) -> str:
        """The rest of the text (the sequence ended for another reason than a stop string)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

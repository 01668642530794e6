"""A sequence's text as its tokens arrive: what can be sent now, and where a stop string ends it."""
from __future__ import annotations


class TextStream:
    """Decodes the tokens as they come and hands out only text that is final: no half UTF-8 character (decoded as
    U+FFFD) and no tail that could still grow into a stop string. A stop string ends the text before it.

    Each token costs a decode of the last few tokens, not of the whole sequence: the tokens since `read` are decoded
    after those since `prefix` (the context that decides how they join on), and their text is kept once it ends in
    a whole character."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tok, self.stops = tokenizer, [s for s in stops if s]
        self.ids: list[int] = []
        self.prefix = self.read = 0   # token offsets: context start, start of the text not yet kept
        self.kept = ""                # text of ids[:read]
        self.text = ""                # the text so far (cut at a stop string once one is reached)
        self.sent = 0                 # characters handed out
        self.stopped = False

    def add(self, token: int) -> tuple[str, bool]:
        """-> (new final text, whether a stop string was reached); nothing more once one was."""
        if self.stopped:
            return "", True
        self.ids.append(token)
        searched = len(self.kept)         # text before it is final and was searched when it came
        piece = self._piece()
        text = self.kept + piece
        hits = [i for i in (text.find(s, max(0, searched - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            return self._take(len(self.text)), True
        self.text = text
        end = len(self.kept) + len(piece.rstrip("\ufffd"))
        hold = max((n for s in self.stops for n in range(1, len(s)) if text[:end].endswith(s[:n])), default=0)
        return self._take(end - hold), False

    def _piece(self) -> str:
        """The text of ids[read:]; kept (and the offsets moved on) when it ends in a whole character."""
        context = self.tok.decode(self.ids[self.prefix:self.read])
        piece = self.tok.decode(self.ids[self.prefix:])[len(context):]
        if not piece.endswith("\ufffd"):
            self.kept += piece
            self.prefix, self.read = self.read, len(self.ids)
            return ""
        return piece

    def flush(self) -> str:
        """The rest of the text (the sequence ended for another reason than a stop string)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

"""Continuous batching on one engine: sequences join and leave a running batch at step boundaries.

All rows share one timeline of cache slots: a decode step writes slot `cur` of every active row. A sequence joins
by having its prompt prefilled alone into the next free row, ending at `cur` (its own slots start at `first[r]`,
from which its positions count, and the slots before are masked out), then takes part in the next step. Active
rows are always 0..n-1 (a leaving row takes the last row's contents), so a step is the engine's usual decode over
the first n rows, CUDA graphs included. Slots run out as the timeline grows: before a join every row moves left by
the slots no row uses, and a prompt longer than `cur` moves the rows right to make room for it."""
from __future__ import annotations

import torch

from .engine import Engine


class Slots:
    """The rows of a running batch on `engine`'s cache. Not thread-safe: one thread drives it."""

    def __init__(self, engine: Engine):
        self.e, self.cap, self.rows = engine, engine.context_len, engine.run.max_batch_size
        self.valid = torch.zeros(self.rows, self.cap, dtype=torch.bool)   # [B, cap] slots a row may attend to
        self.first = torch.zeros(self.rows, dtype=torch.long)             # [B] each row's first slot
        self.left = [0] * self.rows           # slots each row may still write (its new tokens less one)
        self.n = 0
        self.cur = 0

    def fits(self, prompt_len: int, max_new: int) -> bool:
        """Whether a sequence of this prompt and at most max_new new tokens can join now."""
        if self.n == self.rows:
            return False
        if self.n == 0:
            return prompt_len + max_new - 1 <= self.cap
        cur = max(self.cur - int(self.first[:self.n].min()), prompt_len)
        return cur + max(max_new - 1, *self.left[:self.n]) <= self.cap

    def _shift(self, by: int) -> None:
        if by == 0:
            return
        self.e.cache.shift(self.n, by, self.cur)
        self.first[:self.n] += by
        self.cur += by
        self.valid[:self.n] = torch.arange(self.cap)[None] >= self.first[:self.n, None]

    def join(self, prompt: list[int], max_new: int) -> tuple[int, torch.Tensor]:
        """Prefill `prompt` into a new row -> (the row, logits of its last token [V] float32). Check `fits` first."""
        self.e._check([prompt], max_new)
        if not self.fits(len(prompt), max_new):
            raise RuntimeError("no room for this sequence now: check fits() before join()")
        P = len(prompt)
        if self.n == 0:
            self.cur = P
        else:
            self._shift(-int(self.first[:self.n].min()))
            self._shift(max(0, P - self.cur))
        r, start = self.n, self.cur - P
        self.n += 1
        self.first[r], self.left[r] = start, max_new - 1
        self.valid[r] = torch.arange(self.cap) >= start
        ids = torch.tensor([prompt], device=self.e.device)
        chunk, view = self.e.run.prefill_chunk_tokens, self.e.cache.row(r)
        for s in range(0, P, chunk):
            T = min(chunk, P - s)
            st = self.e._state(self.valid[r:r + 1], self.first[r:r + 1], start + s, T)
            logits = self.e.model.forward(ids[:, s:s + T], view, st)
        return r, logits[0].float()

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Each active row's last token (row order) -> next-token logits [n, V] float32; writes slot `cur`."""
        assert len(tokens) == self.n > 0 and self.cur < self.cap
        self.e.fit_threads()
        tok = torch.tensor(tokens, device=self.e.device)
        n = self.n
        logits = self.e._decode(tok, self.e.cache.batch(n), self.valid[:n], self.first[:n], self.cur)
        self.cur += 1
        for r in range(n):
            self.left[r] -= 1
        return logits.float()

    def leave(self, r: int) -> int:
        """Free row r; the last row moves into it. -> the row that moved (r itself if it was the last)."""
        last = self.n - 1
        if r != last:
            self.e.cache.copy_row(last, r)
            self.valid[r], self.first[r], self.left[r] = self.valid[last], self.first[last], self.left[last]
        self.n -= 1
        return last

"""Continuous batching on one engine: sequences join and leave a running batch at step boundaries.

All rows share one timeline of cache slots: a decode step writes slot `cur` of every active row. Sequences join by
having their prompts prefilled together (left-padded, one forward: each expert's weights are read once for all of
them) into the next free rows, ending at `cur` (a row's own slots start at `first[r]`, from which its positions
count, and the slots before are masked out), then take part in the next step. Active rows are always 0..n-1 (a
leaving row takes the last row's contents), so a step is the engine's usual decode over the first n rows, CUDA
graphs included. Slots run out as the timeline grows: before a join every row moves left by the slots no row uses,
and a prompt longer than `cur` moves the rows right to make room for it."""
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

    def fits(self, prompt_lens: list[int], max_news: list[int]) -> bool:
        """Whether sequences of these prompt lengths and at most these new tokens can join now, together."""
        if self.n + len(prompt_lens) > self.rows:
            return False
        longest = max(prompt_lens)
        cur = longest if self.n == 0 else max(self.cur - int(self.first[:self.n].min()), longest)
        return cur + max([m - 1 for m in max_news] + self.left[:self.n]) <= self.cap

    def _mark(self, a: int, b: int) -> None:
        """Rows a..b-1 may attend to their own slots, from first[r] on."""
        self.valid[a:b] = torch.arange(self.cap)[None] >= self.first[a:b, None]

    def _shift(self, by: int) -> None:
        if by == 0:
            return
        self.e.cache.shift(self.n, by, self.cur)
        self.first[:self.n] += by
        self.cur += by
        self._mark(0, self.n)

    def join(self, prompts: list[list[int]], max_news: list[int]) -> tuple[int, torch.Tensor]:
        """Prefill `prompts` into new rows -> (their first row, logits of each one's last token [k, V] float32);
        the k rows follow each other. Check `fits` first."""
        for p, m in zip(prompts, max_news):
            self.e.check_prompts([p], m)
        if not self.fits([len(p) for p in prompts], max_news):
            raise RuntimeError("no room for these sequences now: check fits() before join()")
        P, k, r0 = max(len(p) for p in prompts), len(prompts), self.n
        if self.n == 0:
            self.cur = P
        else:
            self._shift(-int(self.first[:self.n].min()))
            self._shift(max(0, P - self.cur))
        ids = torch.zeros(k, P, dtype=torch.long)
        for i, (p, m) in enumerate(zip(prompts, max_news)):
            self.first[r0 + i], self.left[r0 + i] = self.cur - len(p), m - 1
            ids[i, P - len(p):] = torch.tensor(p)
        self.n += k
        self._mark(r0, self.n)
        start, view = self.cur - P, self.e.cache.rows(r0, r0 + k)        # ids stay on the host: embedded there
        chunk = max(1, self.e.run.prefill_chunk_tokens // k)
        for s in range(0, P, chunk):
            T = min(chunk, P - s)
            st = self.e.step_state(self.valid[r0:r0 + k], self.first[r0:r0 + k], start + s, T)
            logits = self.e.model.forward(ids[:, s:s + T], view, st)
        return r0, logits.float()

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Each active row's last token (row order) -> next-token logits [n, V] float32; writes slot `cur`."""
        assert len(tokens) == self.n > 0 and self.cur < self.cap
        self.e.fit_threads()
        tok = torch.tensor(tokens)                   # embedded on the host
        n = self.n
        logits = self.e.decode_step(tok, self.e.cache.batch(n), self.valid[:n], self.first[:n], self.cur)
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

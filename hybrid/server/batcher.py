"""Continuous batching: one thread owns the engine and runs steps; requests join and leave between steps.

Each iteration admits waiting sequences while the batch has a free row and cache room (each prompt prefilled alone
into its row: engine/slots.py), runs one decode step over every running sequence, and frees the rows of those that
finished, stopped or were cancelled (their client went away). Requests beyond the waiting room are refused."""
from __future__ import annotations

import threading
import traceback
from collections import deque

import torch

from ..engine.engine import Engine
from ..engine.slots import Slots
from ..offload.stats import RunStats
from .metrics import Metrics
from .sequence import Sequence


class Overloaded(RuntimeError):
    """The waiting room is full."""


class Batcher:
    def __init__(self, engine: Engine, max_waiting: int = 64, metrics: Metrics | None = None):
        self.engine, self.slots = engine, Slots(engine)
        self.max_waiting, self.metrics = max_waiting, metrics or Metrics()
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence | None] = [None] * self.slots.rows
        self.cond = threading.Condition()
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self.thread.start()

    def submit(self, seq: Sequence) -> None:
        with self.cond:
            if len(self.waiting) >= self.max_waiting:
                raise Overloaded(f"{len(self.waiting)} requests are already waiting (the limit): retry later")
            self.waiting.append(seq)
            self.cond.notify()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        self.thread.join(timeout=10)

    @property
    def running(self) -> int:
        return self.slots.n

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.closed and not self.waiting and self.slots.n == 0:
                    self.cond.wait()
                if self.closed:
                    break
            try:
                self._iteration()
            except Exception as e:        # the engine failed: end every sequence involved, keep serving
                self._fail(f"{type(e).__name__}: {e}", traceback.format_exc())

    @torch.no_grad()
    def _iteration(self) -> None:
        stats = RunStats(self.engine.run.mode, self.slots.n, 0, self.engine.device.type)
        self.engine.backend.begin(stats)
        try:
            self._admit()
            self._retire()                   # those that ended at their first token take no step
            n = self.slots.n
            if n:
                logits = self.slots.step([self.rows[r].tokens[-1] for r in range(n)])     # [n, V]
                self._push_all(logits)
        finally:
            self.engine.backend.end(stats)
            self._retire()
            self.metrics.iteration(stats, self.slots.n, len(self.waiting))

    def _admit(self) -> None:
        while True:
            with self.cond:
                if not self.waiting:
                    return
                seq = self.waiting[0]
                if not seq.cancelled.is_set() and not self.slots.fits(len(seq.prompt), seq.params.max_new_tokens):
                    return
                self.waiting.popleft()
            if seq.cancelled.is_set():          # its client went away while it waited
                seq.finish("cancelled")
                self.metrics.finished(seq)
                continue
            try:
                r, logits = self.slots.join(seq.prompt, seq.params.max_new_tokens)
            except Exception as e:
                seq.finish("error", error=f"{type(e).__name__}: {e}")
                raise
            self.rows[r] = seq
            self._push(r, int(logits.argmax()) if seq.greedy else seq.sample(logits))

    def _push_all(self, logits: torch.Tensor) -> None:
        """Each running row's next token: greedy ones from one argmax on the device (only [n] ids cross to the
        host), sampled ones from their own row of logits."""
        greedy = logits.argmax(-1).tolist()
        for r in range(len(greedy)):
            seq = self.rows[r]
            self._push(r, greedy[r] if seq.greedy else seq.sample(logits[r]))

    def _push(self, r: int, token: int) -> None:
        seq = self.rows[r]
        first = not seq.tokens
        seq.push(token)
        self.metrics.token(seq, first)

    def _retire(self) -> None:
        for r in reversed(range(self.slots.n)):
            seq = self.rows[r]
            if seq is None or not seq.done:
                continue
            if seq.finish_reason is None:
                seq.finish("cancelled")
            self.metrics.finished(seq)
            last = self.slots.leave(r)
            self.rows[r], self.rows[last] = self.rows[last] if last != r else None, None

    def _fail(self, message: str, trace: str) -> None:
        import sys
        print(f"error: the engine failed; its sequences end: {message}\n{trace}", file=sys.stderr)
        for r in reversed(range(self.slots.n)):
            seq = self.rows[r]
            if seq is not None:
                seq.finish("error", error=message)
                self.metrics.finished(seq)
            self.slots.leave(r)
            self.rows[r] = None

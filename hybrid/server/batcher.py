"""Continuous batching: one thread owns the engine and runs steps; requests join and leave between steps.

Each iteration admits waiting sequences while the batch has free rows and cache room (their prompts prefilled
together, up to JOIN_TOKENS padded tokens at a time: engine/slots.py), runs one decode step over every running
sequence, and frees the rows of those that finished, stopped or were cancelled (their client went away). Requests
beyond the waiting room are refused.

Requests that come in a burst join in one prefill: an offloaded prefill streams nearly every expert of a layer
whether it holds one prompt or sixteen, so a burst split into a prefill of the first arrival and one of the rest
costs the rest a second prefill (16 clients at once on loopback joined as 7 + 9, then 2 + 14). Waiting requests join once none
has arrived for JOIN_QUIET_S, the oldest has waited JOIN_WAIT_S, or they fill the free rows; meanwhile the running
sequences take their decode steps."""
from __future__ import annotations

import threading
import time
import traceback
from collections import deque

import torch

from ..engine.engine import Engine
from ..engine.slots import Slots
from ..offload.stats import RunStats
from .metrics import Metrics
from .sequence import Sequence


JOIN_TOKENS = 2048      # padded prompt tokens prefilled in one join: more waits for the next iteration, so running
                        # sequences' next tokens are not held up behind one long joint prefill
JOIN_QUIET_S = 0.010    # a burst is over once no request has arrived for this long
JOIN_WAIT_S = 0.050     # the longest a request waits for the rest of its burst


class Overloaded(RuntimeError):
    """The waiting room is full."""


class Batcher:
    """Owns the engine. `run` is its loop: serve.py runs it on the main thread (where the engine's CPU work runs as
    fast as in run.py: a second thread's OpenMP team measured 2x slower per token on a 2-core CPU, its workers'
    spin-wait throttled); `start` runs it on a thread of its own instead (tests)."""

    def __init__(self, engine: Engine, max_waiting: int = 64, metrics: Metrics | None = None):
        self.engine, self.slots = engine, Slots(engine)
        self.max_waiting, self.metrics = max_waiting, metrics or Metrics()
        self.waiting: deque[Sequence] = deque()
        self.rows: list[Sequence | None] = [None] * self.slots.rows
        self.cond = threading.Condition()
        self.closed = False
        self.thread: threading.Thread | None = None

    @torch.no_grad()
    def warm_up(self, prompt_tokens: int = 64) -> float:
        """Before the first request: a joint prefill of a full batch of made-up prompts (prompt_tokens each), a
        decode step at every batch size from full down to one, then one shorter prompt of odd length alone and its
        step (Triton specialises integer arguments on their divisibility by 16): kernels compile and every batch
        size's decode graphs are captured now (one shared pool: engine/graphs.DecodeRunner), not in the first
        requests' latency (on the GPU box, without it, one request in ten at the first concurrency level measured
        waited ~2 s for its first token). Metrics do not count it; the rows end free. -> seconds it took."""
        t0 = time.perf_counter()
        vocab, cap = self.engine.cfg.vocab_size, self.slots.cap
        gen = torch.Generator().manual_seed(0)
        full = max(1, min(prompt_tokens, cap // 2))
        for k, P in ((self.slots.rows, full), (1, full * 3 // 5 | 1)):
            news = [min(k + 1, cap - P)] * k
            prompts = [torch.randint(vocab, (P,), generator=gen).tolist() for _ in range(k)]
            stats = RunStats(self.engine.run.mode, k, P, self.engine.device.type)
            self.engine.backend.begin(stats)
            try:
                if self.slots.fits([P] * k, news):
                    self.slots.join(prompts, news)
                while self.slots.n:
                    if self.slots.left[0] > 0:
                        self.slots.step([0] * self.slots.n)
                    self.slots.leave(self.slots.n - 1)
            finally:
                self.engine.backend.end(stats)
        return time.perf_counter() - t0

    def start(self) -> "Batcher":
        self.thread = threading.Thread(target=self.run, name="batcher", daemon=True)
        self.thread.start()
        return self

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
        if self.thread is not None:
            self.thread.join(timeout=10)

    @property
    def running(self) -> int:
        return self.slots.n

    def run(self, stop=lambda: False) -> None:
        """Iterate until `close()`, or until `stop()` holds (asked while idle, every half second)."""
        while True:
            with self.cond:
                while not self.closed and self.slots.n == 0 and not stop():
                    delay = self.join_delay(time.perf_counter())
                    if delay <= 0:
                        break
                    self.cond.wait(min(delay, 0.5))
                if self.closed or stop():
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

    def join_delay(self, now: float) -> float:
        """Seconds until the waiting requests join (<= 0: now; inf: none waits). Call holding `cond`."""
        if not self.waiting:
            return float("inf")
        if len(self.waiting) >= self.slots.rows - self.slots.n:
            return 0.0
        return min(self.waiting[-1].submitted + JOIN_QUIET_S, self.waiting[0].submitted + JOIN_WAIT_S) - now

    def _admit(self) -> None:
        with self.cond:
            if self.join_delay(time.perf_counter()) > 0:
                return
        while True:
            joining = self._next_joining()
            if not joining:
                return
            try:
                r0, logits = self.slots.join([q.prompt for q in joining], [q.params.max_new_tokens for q in joining])
            except Exception as e:
                for q in joining:
                    q.finish("error", error=f"{type(e).__name__}: {e}")
                raise
            for i, seq in enumerate(joining):
                self.rows[r0 + i] = seq
                self._push(r0 + i, int(logits[i].argmax()) if seq.greedy else seq.sample(logits[i]))

    def _next_joining(self) -> list[Sequence]:
        """The waiting sequences, in order, that fit into the batch together (and JOIN_TOKENS); cancelled ones
        met on the way end here."""
        joining: list[Sequence] = []
        while True:
            with self.cond:
                if not self.waiting:
                    return joining
                seq = self.waiting[0]
                if not seq.cancelled.is_set():
                    lens = [len(q.prompt) for q in joining] + [len(seq.prompt)]
                    news = [q.params.max_new_tokens for q in joining] + [seq.params.max_new_tokens]
                    too_long = joining and len(lens) * max(lens) > JOIN_TOKENS
                    if too_long or not self.slots.fits(lens, news):
                        return joining
                self.waiting.popleft()
            if seq.cancelled.is_set():          # its client went away while it waited
                seq.finish("cancelled")
                self.metrics.finished(seq)
                continue
            joining.append(seq)

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

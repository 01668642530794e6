"""Per-layer times of the offloaded MoE layers, predicted beside measured (the cost model's accuracy figures).

On CUDA the marks are timing events from a pool that every run reuses (recorded on the compute stream, read once
at the end of the run); on the CPU, perf_counter stamps."""
from __future__ import annotations

import time

import torch


class LayerTimer:
    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.events: list = []
        self.used = 0
        self.spans: list[tuple] = []        # (start mark, end mark, predicted ms, the model's own ms, tokens)
        self.seen = 0                       # spans handed to `finished` so far

    def rewind(self) -> None:
        """A new run: forget the spans, reuse the events."""
        self.used, self.spans, self.seen = 0, [], 0

    def mark(self):
        """A timestamp now (a recorded event on CUDA)."""
        if not self.cuda:
            return time.perf_counter()
        if self.used == len(self.events):
            self.events.append(torch.cuda.Event(enable_timing=True))
        ev = self.events[self.used]
        self.used += 1
        ev.record()
        return ev

    def span(self, start, predicted_ms: float, model_ms: float | None = None, tokens: int = 0) -> None:
        """One layer of `tokens` tokens from `start` (a mark) to now, with the time predicted for it (and the cost
        model's own figure, before any online correction)."""
        self.spans.append((start, self.mark(), predicted_ms, predicted_ms if model_ms is None else model_ms, tokens))

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1000 * (b - a)

    def finished(self) -> list[tuple[int, float, float]]:
        """(tokens, measured ms, model ms) of the spans not returned before whose end the device has passed
        (no wait: on CUDA it asks each end event)."""
        out = []
        while self.seen < len(self.spans):
            a, b, _, model, tokens = self.spans[self.seen]
            if self.cuda and not b.query():
                break
            out.append((tokens, self._ms(a, b), model))
            self.seen += 1
        return out

    def read(self) -> tuple[list[float], list[float], list[float]]:
        """(measured, predicted, the model's own) ms per layer of the run; on CUDA this waits for the device."""
        if self.cuda:
            torch.cuda.synchronize()
        return ([self._ms(a, b) for a, b, *_ in self.spans], [s[2] for s in self.spans],
                [s[3] for s in self.spans])

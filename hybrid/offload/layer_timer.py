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
        self.spans: list[tuple[object, object, float]] = []      # (start mark, end mark, predicted ms)

    def rewind(self) -> None:
        """A new run: forget the spans, reuse the events."""
        self.used, self.spans = 0, []

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

    def span(self, start, predicted_ms: float) -> None:
        """One layer from `start` (a mark) to now, with the time the planner predicted for it."""
        self.spans.append((start, self.mark(), predicted_ms))

    def read(self) -> tuple[list[float], list[float]]:
        """(measured ms, predicted ms) per layer of the run; on CUDA this waits for the device."""
        if self.cuda:
            torch.cuda.synchronize()
            measured = [a.elapsed_time(b) for a, b, _ in self.spans]
        else:
            measured = [1000 * (b - a) for a, b, _ in self.spans]
        return measured, [p for _, _, p in self.spans]

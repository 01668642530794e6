"""Prefill copy-ahead: at the end of layer L's copies, copy some of layer L+1's uncached experts into staging slots.

A prefill chunk of a few hundred tokens needs nearly every expert of every layer (256 tokens x top-6 of 64 leave
none out when routing is near uniform), but layer L+1's routing is known only after layer L's combine and L+1's
attention and router: ~2 ms at 256 tokens in which the PCIe lane idles (eval/probes/prefill_trace.py). Copies queued
after layer L's (and after its CPU results, which would otherwise wait behind them on the copy engine) fill that
gap, and layer L+1 plans with them as resident. How many: the PCIe lane's idle time
before each prefill layer's routing (by the cost model), learned as the prefill goes, in whole copies. Pure Python."""
from __future__ import annotations

from typing import Callable


class CopyAhead:
    """Sizes and picks the copies made ahead for the next layer during a prefill layer."""

    def __init__(self, fetch_ms: float, max_copies: int, alpha: float = 0.5):
        self.fetch_ms, self.max_copies, self.alpha = fetch_ms, max_copies, alpha
        self.gap_ms: float | None = None      # the PCIe lane's idle gap before a prefill layer's routing, smoothed
        self.issued = 0                       # copies made ahead for the layer routed next

    def observe(self, idle_ms: float) -> None:
        """At a prefill layer's routing: how long the PCIe lane has been idle (ms; < 0: copies still queued),
        counting the copies made ahead for this layer as idle time they filled."""
        gap = max(0.0, idle_ms + self.issued * self.fetch_ms)
        self.gap_ms = gap if self.gap_ms is None else (1 - self.alpha) * self.gap_ms + self.alpha * gap
        self.issued = 0

    def count(self) -> int:
        """Copies to make ahead now: the gap in whole copies, at most `max_copies`; none before a first gap."""
        if self.gap_ms is None or self.fetch_ms <= 0:
            return 0
        return max(0, min(self.max_copies, int(self.gap_ms / self.fetch_ms)))

    @staticmethod
    def choose(n: int, n_experts: int, resident: set[int], value: Callable[[int], float] | None = None,
               predicted: list[int] | None = None) -> list[int]:
        """n uncached experts: the predicted ones first (most votes first), then by the cache policy's value."""
        order = [e for e in dict.fromkeys(predicted or []) if e not in resident]
        taken = resident | set(order)
        rest = [e for e in range(n_experts) if e not in taken]
        if value is not None:
            rest.sort(key=lambda e: -value(e))
        return (order + rest)[:n]

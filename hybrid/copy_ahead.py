"""Copy-ahead: at the end of layer L's copies, copy some of layer L+1's uncached experts into staging slots.

Layer L+1's routing is known only after layer L's combine and L+1's attention and router, a gap in which the PCIe
lane idles: ~2 ms per layer in a prefill of 256 tokens (eval/prefill_trace.py), ~0.6 ms at batch-16 decode (the
routing wait plus planning and slot admission, eval/profile_layers.py). Copies queued behind layer L's fill that gap,
and layer L+1 plans with them as resident. How many: the PCIe lane's idle time before each layer's copies (by the
cost model), learned as the run goes, in whole copies. Whether: a prefill chunk needs nearly every expert, but a
decode step of T tokens needs about 1 - (1 - K/E)^T of them (uniform routing: 9% at batch 1, 79% at batch 16),
so decode copies ahead only while the share of its copies that the next layer used stays >= MIN_USE. Pure Python."""
from __future__ import annotations

from typing import Callable

MIN_USE = 0.5          # a copy made ahead must be used at least this often to be worth its slot and PCIe time


class CopyAhead:
    """Sizes and picks the copies made ahead for the next layer (one instance for prefill, one for decode)."""

    def __init__(self, fetch_ms: float, max_copies: int, top_k: int, n_experts: int, alpha: float = 0.5):
        self.fetch_ms, self.max_copies, self.alpha = fetch_ms, max_copies, alpha
        self.top_k, self.n_experts = top_k, n_experts
        self.gap_ms: float | None = None      # the PCIe lane's idle gap before a layer's copies, smoothed
        self.issued = 0                       # copies made ahead for the layer routed next
        self.use: dict[int, float] = {}       # tokens per layer -> share of the copies made ahead that got used

    def observe(self, idle_ms: float) -> None:
        """Before a layer's own copies: how long the PCIe lane has been idle (ms; < 0: copies still queued),
        counting the copies made ahead for this layer as idle time they filled."""
        gap = max(0.0, idle_ms + self.issued * self.fetch_ms)
        self.gap_ms = gap if self.gap_ms is None else (1 - self.alpha) * self.gap_ms + self.alpha * gap
        self.issued = 0

    def useful(self, T: int) -> float:
        """The share of copies made ahead that a layer of T tokens uses: learned, else the uniform-routing guess."""
        return self.use.get(T, 1 - (1 - self.top_k / self.n_experts) ** T)

    def note_use(self, T: int, used: int, made: int) -> None:
        if made:
            self.use[T] = (1 - self.alpha) * self.useful(T) + self.alpha * used / made

    def count(self, T: int) -> int:
        """Copies to make ahead now for a layer of T tokens: the gap in whole copies, at most `max_copies`; none
        before a first gap or while too few of them get used."""
        if self.gap_ms is None or self.fetch_ms <= 0 or self.useful(T) < MIN_USE:
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

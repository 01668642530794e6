"""Eviction policies for the GPU expert cache. Pure Python: they rank keys, the cache owns the slots."""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Iterable


class Policy:
    """Tracks uses of cached keys and names a victim among candidates; may refuse to admit new keys."""
    admits = True

    def touch(self, key: Hashable) -> None: ...

    def insert(self, key: Hashable) -> None:
        self.touch(key)

    def remove(self, key: Hashable) -> None: ...

    def tick(self) -> None:
        """One decode step (or prefill chunk) has passed."""

    def victim(self, candidates: Iterable[Hashable]) -> Hashable | None:
        return next(iter(self.ranked(candidates)), None)

    def ranked(self, candidates: Iterable[Hashable]) -> list[Hashable]:
        """Candidates in eviction order, first evicted first."""
        raise NotImplementedError


class LFUDecay(Policy):
    """Frequency with exponential decay: score = uses, multiplied by `decay` every step; evict the lowest.

    Counts are kept for uncached keys too, so an expert that keeps coming back wins its slot."""

    def __init__(self, decay: float = 0.95):
        self.decay, self.step = decay, 0
        self.score: dict[Hashable, tuple[float, int]] = {}     # key -> (score, step of that score)

    def value(self, key: Hashable) -> float:
        s, at = self.score.get(key, (0.0, self.step))
        return s * self.decay ** (self.step - at)

    def touch(self, key: Hashable) -> None:
        self.score[key] = (self.value(key) + 1.0, self.step)

    def tick(self) -> None:
        self.step += 1

    def ranked(self, candidates: Iterable[Hashable]) -> list[Hashable]:
        return sorted(candidates, key=self.value)


class LRU(Policy):
    """Least recently used."""

    def __init__(self):
        self.order: OrderedDict[Hashable, None] = OrderedDict()

    def touch(self, key: Hashable) -> None:
        self.order[key] = None
        self.order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self.order.pop(key, None)

    def ranked(self, candidates: Iterable[Hashable]) -> list[Hashable]:
        allowed = set(candidates)
        return [k for k in self.order if k in allowed]


class Static(Policy):
    """The initial placement (e.g. the most frequent experts of a profile) stays; misses never enter."""
    admits = False

    def ranked(self, candidates: Iterable[Hashable]) -> list[Hashable]:
        return []


def make_policy(name: str) -> Policy:
    try:
        return {"lfu": LFUDecay, "lru": LRU, "static": Static}[name]()
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}: choose lfu, lru or static") from None

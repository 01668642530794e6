"""How many threads this process should run now: the cores that other processes keep busy, sampled in the
background, become one thread fewer each (the engine applies the count between steps).

A team of threads sized to every core, with spinning barriers, collapses when another process takes a core: the
member that shares it with that process runs a time slice now and then, and every barrier of every step waits for
it (measured on a 2-core machine: 3-4x slower per token with one busy core, up to 35x with two). One thread fewer
per busy core keeps the team on cores of its own."""
from __future__ import annotations

import os
import threading
import time

import psutil

INTERVAL_S = 0.2


def threads_for(cores: int, others: float, most: int) -> int:
    """Threads for `cores` cores of which other processes keep `others` busy (half a core's load counts as one):
    at least 1, at most `most`."""
    return max(1, min(most, cores - int(others + 0.5)))


def usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def default_threads(gpu: bool) -> int:
    """All usable cores; with a GPU all but one: the spare core absorbs the CUDA driver's and Python's other
    threads, which would otherwise stall one member of the team (0.25 vs 0.39 ms per 1-token expert with 15 vs 16
    threads on the 16-core GPU box, eval/probes/lane_probe.py)."""
    cores = len(usable_cpus())
    return max(1, cores - 1) if gpu else cores


class CoreWatch:
    """Samples, every INTERVAL_S on a daemon thread, how many of this process's cores other processes keep busy:
    the busy time of those cores (/proc/stat) less this process's own CPU time, per second of wall time. Niced
    processes do not count: the scheduler gives our threads their cores back (a nice-19 neighbour gets ~1.5%)."""

    def __init__(self, interval_s: float = INTERVAL_S, start: bool = True):
        self.cpus = usable_cpus()
        self.others = 0.0                   # cores' worth of other processes' load over the last interval
        self._proc = psutil.Process()
        self._interval = interval_s
        self._last = self._sample()
        if start:
            threading.Thread(target=self._loop, name="core-watch", daemon=True).start()

    def _sample(self) -> tuple[float, float, float]:
        per = psutil.cpu_times(percpu=True)
        busy = sum(t.user + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)
                   for i, t in enumerate(per) if i in self.cpus)
        mine = self._proc.cpu_times()
        return time.monotonic(), busy, mine.user + mine.system

    def _loop(self) -> None:
        while True:
            time.sleep(self._interval)
            self.update(self._sample())

    def update(self, now: tuple[float, float, float]) -> None:
        """now: (wall s, busy s of our cores, this process's CPU s) -> others over the time since the last one."""
        wall = now[0] - self._last[0]
        self.others = max(0.0, (now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
        self._last = now

    def threads(self, most: int) -> int:
        return threads_for(len(self.cpus), self.others, most)


_WATCH: list[CoreWatch] = []


def core_watch() -> CoreWatch:
    """The process's one CoreWatch, started on first use."""
    if not _WATCH:
        _WATCH.append(CoreWatch())
    return _WATCH[0]

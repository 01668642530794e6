"""The lanes that run beside GPU compute: a copy stream for PCIe and a pinned CPU worker for CPU experts.

On a CPU compute device the copy lane degenerates to plain synchronous copies (no streams, no events)."""
from __future__ import annotations

import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor

import torch


class CopyLane:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    def event(self, stream=None):
        """An event recorded now on `stream` (default: the compute stream); None on CPU."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=False)
        ev.record(stream or torch.cuda.current_stream())
        return ev

    def timing_event(self):
        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None):
        """dst <- src on the copy stream once `after` (an event) has fired; returns the completion event."""
        if not self.cuda:
            dst.copy_(src)
            return None
        if after is not None:
            self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)
        return self.event(self.stream)

    def copy_many(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: list) -> object:
        """dst <- src for each pair, back to back on the copy stream once every event in `after` has fired;
        returns one completion event for all of them."""
        if not self.cuda:
            for dst, src in pairs:
                dst.copy_(src)
            return None
        for ev in after:
            self.stream.wait_event(ev)
        with torch.cuda.stream(self.stream):
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
        return self.event(self.stream)

    @staticmethod
    def wait(ev) -> None:
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)


_CORES: list[int] = []


def all_cores() -> list[int]:
    """The cores this process may use, read once (before any lane pins the main thread to its own core)."""
    if not _CORES:
        _CORES.extend(sorted(os.sched_getaffinity(0)))
    return _CORES


def reserve_main_thread() -> None:
    """The thread that drives the GPU does no CPU math: one OpenMP thread, so it never owns a team of OpenMP
    workers. Call it before that thread's first parallel CPU op. A second team would push libgomp past one
    thread per core, where it stops spinning between parallel regions: the CPU lane then pays a futex wake-up
    at every GEMV, 0.21 -> 0.36-0.65 ms per 1-token expert on the H200 box (eval/lane_probe.py)."""
    torch.set_num_threads(1)


def split_cores(reserve: int = 1) -> tuple[set[int], set[int]]:
    """(cores for the CPU expert lane, cores for the thread that issues GPU work and copies)."""
    cores = all_cores()
    if len(cores) <= reserve:
        return set(cores), set(cores)
    return set(cores[:-reserve]), set(cores[-reserve:])


SWITCH_S = 2e-5     # torch kernel launches hold the GIL: the default 5 ms switch interval would let the
                    # GPU-driving thread keep the lane thread from even starting its (GIL-free) expert call


class CpuLane:
    """One worker thread (with its own OpenMP team) on all cores but the copy-issuing one."""

    def __init__(self, threads: int | None = None, pin: bool = True):
        compute, issuer = split_cores()
        self.threads = threads or len(compute)
        self.pin = pin

        def init() -> None:
            if pin:
                os.sched_setaffinity(0, compute)
            torch.set_num_threads(self.threads)
        if pin:
            reserve_main_thread()
            os.sched_setaffinity(0, issuer)
            sys.setswitchinterval(SWITCH_S)
        self.pool = ThreadPoolExecutor(1, initializer=init, thread_name_prefix="cpu-experts")

    def submit(self, fn, *args) -> Future:
        return self.pool.submit(fn, *args)


class PinnedBuffer:
    """A reusable host buffer (page-locked on CUDA machines) that grows to the largest request."""

    def __init__(self, cols: int, dtype: torch.dtype, pin: bool):
        self.cols, self.dtype, self.pin = cols, dtype, pin
        self.buf = torch.empty(0, cols, dtype=dtype)

    def rows(self, n: int) -> torch.Tensor:
        if n > self.buf.shape[0]:
            self.buf = torch.empty(max(n, 2 * self.buf.shape[0]), self.cols, dtype=self.dtype, pin_memory=self.pin)
        return self.buf[:n]

"""The lanes that run beside GPU compute: a copy stream for PCIe, and CPU experts on the driving thread.

On a CPU compute device the copy lane degenerates to plain synchronous copies (no streams, no events)."""
from __future__ import annotations

import os

import numpy as np
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


def default_threads() -> int:
    """All cores but one: the spare core absorbs the CUDA driver's and Python's other threads, which would
    otherwise stall one member of the OpenMP team (0.25 vs 0.39 ms per 1-token expert with 15 vs 16 threads
    on the 16-core GPU box, eval/lane_probe.py)."""
    return max(1, (os.cpu_count() or 1) - 1)


class CpuLane:
    """A layer's CPU experts. By default on the native kernel's own thread pool, handed over right after planning
    so that they run while the driving thread admits slots, issues copies and queues the GPU work, which it then
    joins (`CpuExperts.start_rows` / `wait`); with AMX (the kernel's tile path) that includes prefill's experts of
    many tokens. Calls the pool does not take (experts of more than 8 tokens without AMX, no compiler) run on the
    driving thread's OpenMP team after the GPU work is queued.

    Measured on the H200 box (eval/NOTES.md): a Python worker thread cost a hand-off (queue, wake-up, GIL) of
    0.1-0.4 ms per layer, and two busy teams push libgomp past one thread per core, where it stops spinning between
    parallel regions (0.21 -> 0.36-0.65 ms per 1-token expert): the pool lives outside Python and OpenMP, and sleeps
    while torch's team runs CPU experts."""

    def __init__(self, threads: int | None = None, cuda: bool = True, kernel: str = "auto", pool: bool = True,
                 tiles: str = "auto"):
        from .cpu_experts import CpuExperts
        if threads or cuda:
            torch.set_num_threads(threads or default_threads())
        self.threads = torch.get_num_threads()
        # a layer's CPU experts; with the pool, started before the GPU work is queued. The pool has one member
        # fewer than the team: the driving thread joins the job in `wait`, once its host work is done. Idle
        # members spin 2 ms on a GPU machine (the next layer's job follows within it), sleep at once on a CPU one.
        members = max(1, self.threads - 1) if cuda else self.threads
        self.experts = CpuExperts(kernel, pool_threads=members if pool else 0, spin_us=2000 if cuda else 0,
                                  tiles=tiles)


TYPESTR = {torch.bfloat16: "<i2", torch.float16: "<f2", torch.float32: "<f4", torch.int32: "<i4", torch.int64: "<i8"}


class _Interface:                         # what torch.as_tensor reads to wrap foreign device memory
    def __init__(self, ptr: int, shape: tuple, typestr: str):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False), "version": 3,
                                         "strides": None}


def device_alias(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor over the same page-locked host memory as `t` (unified addressing: cudaHostAlloc'd memory has
    one address for host and device). Kernels that read it pull the bytes over PCIe themselves, so the read does
    not queue on a copy engine behind expert copies, as a small host-to-device copy does (eval/ce_probe.py)."""
    a = torch.as_tensor(_Interface(t.data_ptr(), tuple(t.shape), TYPESTR[t.dtype]), device="cuda")
    return a.view(t.dtype) if a.dtype != t.dtype else a


def zero_copy_works() -> bool:
    """Whether a kernel reads page-locked host memory through `device_alias` here (checked once per process)."""
    global _ZERO_COPY
    if _ZERO_COPY is None:
        try:
            host = torch.arange(1, 65, dtype=torch.int32).pin_memory()
            _ZERO_COPY = bool(torch.equal(torch.mul(device_alias(host), 1).cpu(), host))
        except (RuntimeError, TypeError, ValueError):
            _ZERO_COPY = False
    return _ZERO_COPY


_ZERO_COPY: bool | None = None


def load(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst (compute device) <- src: a kernel reading a `device_alias` in place, else an asynchronous copy."""
    if src.device == dst.device:
        torch.mul(src, 1, out=dst)
    else:
        dst.copy_(src, non_blocking=True)


class PinnedBuffer:
    """A reusable host buffer (page-locked on CUDA machines) that grows to the largest request. With `alias`, its
    rows are also reachable from the GPU in place (`device_rows`: see `device_alias`)."""

    def __init__(self, cols: int, dtype: torch.dtype, pin: bool, alias: bool = False):
        self.cols, self.dtype, self.pin, self.alias = cols, dtype, pin, alias and pin
        self.buf = torch.empty(0, cols, dtype=dtype)
        self.dev: torch.Tensor | None = None            # the whole buffer as a CUDA tensor (alias)
        self.flat: dict[int, torch.Tensor] = {}         # n -> the first n elements as a 1-D view (hot path)
        self.dev_flat: dict[int, torch.Tensor] = {}

    def rows(self, n: int) -> torch.Tensor:
        if n > self.buf.shape[0]:
            self.buf = torch.empty(max(n, 2 * self.buf.shape[0]), self.cols, dtype=self.dtype, pin_memory=self.pin)
            self.dev = device_alias(self.buf) if self.alias else None
            self.flat, self.dev_flat = {}, {}
        return self.buf[:n]

    def device_rows(self, n: int) -> torch.Tensor:
        """The first n rows where a kernel on the compute device reads them: the alias, else the host rows."""
        host = self.rows(n)
        return host if self.dev is None else self.dev[:n]

    def device_vector(self, n: int) -> torch.Tensor:
        """`vector(n)`'s tensor as `device_rows` gives it."""
        if self.dev is None:
            return self.vector(n)[0]
        if n not in self.dev_flat:
            self.dev_flat[n] = self.dev[:n, 0]
        return self.dev_flat[n]

    def vector(self, n: int) -> tuple[torch.Tensor, np.ndarray]:
        """The first n elements (of a 1-column buffer) as a tensor and as a NumPy array over the same memory."""
        if n not in self.flat:
            self.flat[n] = self.rows(n)[:, 0]
        t = self.flat[n]
        return t, t.numpy()

"""The lanes that run beside GPU compute: a copy stream for PCIe, and CPU experts on the driving thread.

On a CPU compute device the copy lane degenerates to plain synchronous copies (no streams, no events)."""
from __future__ import annotations

import numpy as np
import torch

from .driver_copy import DriverCopy

# A GPU machine's driving thread joins the CPU lane's prefill jobs, not its decode jobs (`CpuLane.join`). A decode
# job (~0.5 ms at batch 1, ~1.3 at batch 16 on 15 threads) is too short for one more worker to repay what joining
# costs the host steps after it: the driving thread streams its share of the weights through its own caches, and
# the next layer's plan, copy issue and CPU rows, all on the path to the next CPU job, then run cold (the first
# Python call after a joined job took 47 us instead of 14 on the development machine). By row counts the two
# overlap (a batch-16 decode job has up to 96 rows, a 128-token prompt's ~50), so the executor says which it is.
NEVER = 1 << 30                  # join_above for jobs the driving thread only watches


class CopyLane:
    def __init__(self, device: torch.device, driver: DriverCopy | None = None):
        """driver: how copies are issued where not through torch (default on a GPU: the CUDA driver's own call)."""
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.driver = driver or (DriverCopy.load() if self.cuda else None)

    def event(self, stream=None):
        """An event recorded now on `stream` (default: the compute stream); None on CPU."""
        if not self.cuda:
            return None
        ev = torch.cuda.Event(enable_timing=False)
        ev.record(stream or torch.cuda.current_stream())
        return ev

    def copy_many(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], after: list) -> object:
        """The bytes of each src into the start of its dst (flat, contiguous, at least as large), back to back on
        the copy stream once every event in `after` has fired; returns one completion event for all of them."""
        for ev in {id(ev): ev for ev in after if ev is not None}.values():    # staging slots read by one layer
            self.stream.wait_event(ev)                                        # share its event
        if self.driver is not None:
            self.driver(self.stream.cuda_stream if self.cuda else 0,
                        [(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size()) for dst, src in pairs])
        elif not self.cuda:
            for dst, src in pairs:
                dst[:src.numel()].copy_(src)
        else:
            with torch.cuda.stream(self.stream):
                for dst, src in pairs:
                    dst[:src.numel()].copy_(src, non_blocking=True)
        return self.event(self.stream)

    @staticmethod
    def done(ev) -> bool:
        """Whether the work before event `ev` has finished (None: nothing pending, as on CPU)."""
        return ev is None or ev.query()

    @staticmethod
    def wait(ev) -> None:
        if ev is not None:
            torch.cuda.current_stream().wait_event(ev)


class CpuLane:
    """A layer's CPU experts. By default on the native kernel's own thread pool, handed over right after planning
    (at decode, right after the copies are issued) so that they run while the driving thread queues the GPU work
    (and in prefill admits slots and issues copies), then waits for
    (`CpuExperts.start_rows` / `wait`); with AMX (the kernel's tile path) that includes prefill's experts of many
    tokens, quantized ones too. Calls the pool does not take (bf16 experts of more than 8 tokens without AMX, no
    compiler) run on the driving thread's OpenMP team after the GPU work is queued.

    Measured on the H200 box (eval/NOTES.md): a Python worker thread cost a hand-off (queue, wake-up, GIL) of
    0.1-0.4 ms per layer, and two busy teams push libgomp past one thread per core, where it stops spinning between
    parallel regions (0.21 -> 0.36-0.65 ms per 1-token expert): the pool lives outside Python and OpenMP, and sleeps
    while torch's team runs CPU experts."""

    def __init__(self, threads: int | None = None, cuda: bool = True, kernel: str = "auto", pool: bool = True,
                 tiles: str = "auto", spin_us: int = 2000, prefetch: bool = True, quant=None, dot: str = "auto"):
        from ..kernels.cpu_experts import CpuExperts
        from ..kernels.cpu_load import default_threads
        if threads or cuda:
            torch.set_num_threads(threads or default_threads(cuda))
        self.threads = torch.get_num_threads()
        # a layer's CPU experts; with the pool, started before the GPU work is queued. On a GPU machine the pool
        # has one member fewer than the threads: the driving thread keeps a core for its host work and, in `wait`,
        # joins only prefill's jobs (`join`, cpu_pool.h); on a CPU machine it joins every job. Idle members spin
        # 2 ms on a GPU machine (the next layer's job follows within it), sleep at once on a CPU one.
        self.cuda = cuda
        members = self.members(self.threads)
        spin = spin_us if cuda else 0
        self.experts = CpuExperts(kernel, pool_threads=members if pool else 0, spin_us=spin,
                                  tiles=tiles, quant=quant, dot=dot)
        if self.experts.lib is not None:
            self.experts.lib.moe_set_prefetch(int(prefetch))
            self.experts.lib.moe_pool_join_above(0)
        self.joins = True                # what the pool was last told (a ctypes call only when it changes)

    def join(self, on: bool) -> None:
        """Whether the driving thread joins the next jobs in `wait` (prefill) or only watches them (decode); a CPU
        machine's always joins (its cores have no other work)."""
        on = on or not self.cuda
        if on != self.joins and self.experts.lib is not None:
            self.experts.lib.moe_pool_join_above(0 if on else NEVER)
            self.joins = on

    def members(self, threads: int) -> int:
        """Pool members for `threads` threads: one fewer on a GPU machine (the driving thread's core)."""
        return max(1, threads - 1) if self.cuda else threads

    def set_threads(self, threads: int) -> None:
        """Run the next layers' CPU experts on `threads` threads (fewer while other processes keep cores busy)."""
        torch.set_num_threads(threads)
        if self.experts.pool_threads:
            self.experts.lib.moe_pool_limit(self.members(threads))


class PinnedBuffer:
    """A reusable host buffer (page-locked on CUDA machines) that grows to the largest request."""

    def __init__(self, cols: int, dtype: torch.dtype, pin: bool):
        self.cols, self.dtype, self.pin = cols, dtype, pin
        self.buf = torch.empty(0, cols, dtype=dtype)
        self.flat: dict[int, torch.Tensor] = {}         # n -> the first n elements as a 1-D view (hot path)

    def rows(self, n: int) -> torch.Tensor:
        if n > self.buf.shape[0]:
            self.buf = torch.empty(max(n, 2 * self.buf.shape[0]), self.cols, dtype=self.dtype, pin_memory=self.pin)
            self.flat = {}
        return self.buf[:n]

    def vector(self, n: int) -> tuple[torch.Tensor, np.ndarray]:
        """The first n elements (of a 1-column buffer) as a tensor and as a NumPy array over the same memory."""
        if n not in self.flat:
            self.flat[n] = self.rows(n)[:, 0]
        t = self.flat[n]
        return t, t.numpy()

    def pack(self, *parts) -> torch.Tensor:
        """The parts (arrays or ints) back to back in the (1-column) buffer -> its first elements as a tensor."""
        sizes = [v.shape[0] if isinstance(v, np.ndarray) else 1 for v in parts]
        buf, arr = self.vector(sum(sizes))
        pos = 0
        for v, n in zip(parts, sizes):
            arr[pos:pos + n] = v
            pos += n
        return buf

"""Microbenchmarks that fill a CostModel on this machine: PCIe copies, GPU and CPU expert times, transfers."""
from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from tqdm import tqdm

from cost_model.costs import CostModel, Curve
from ..kernels.quant_scratch import MIN_ROWS as SCRATCH_MIN_ROWS, ScratchFFN
from ..model.config import cache_dir
from ..model.quant import layout, quantize_expert, split_planes
from .expert_store import huge_page_tensor, pin_in_place

TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
GRAPH_TOKENS = 16             # expert calls up to this many tokens are timed as graph replays (decode steps)
GPU_GROUP = 8                 # GPU experts are timed in groups of this many (prefill's waves and scratch chunks)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fingerprint(device: torch.device, threads: int | None, kernel: str = "torch", experts: str = "bf16") -> dict:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    if not threads:
        from ..kernels.cpu_load import default_threads
        threads = default_threads(device.type == "cuda")
    return {"gpu": gpu, "cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads, "cpu_kernel": kernel,
            "experts": experts}


def default_path(experts: str = "bf16") -> Path:
    """This machine's calibration for an expert format (each format has its own copy and expert times)."""
    return cache_dir() / ("costs.json" if experts == "bf16" else f"costs-{experts}.json")


def _median_ms(fn, reps: int, cuda: bool, before=None) -> float:
    """Median ms of fn() over reps (CUDA events on the current stream where cuda); `before()` runs untimed first."""
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


class Bench:
    """Expert-shaped buffers in a weight format: `n_host` distinct experts in host memory (pinned on CUDA) and
    GPU_GROUP device slots."""

    def __init__(self, device: torch.device, hidden: int, inter: int, dtype: torch.dtype, n_host: int,
                 experts: str = "bf16"):
        self.device, self.cuda, self.hidden, self.inter = device, device.type == "cuda", hidden, inter
        shape = SimpleNamespace(hidden_size=hidden, moe_intermediate_size=inter, expert_numel=3 * hidden * inter)
        self.quant = None if experts == "bf16" else layout(shape, experts)
        self.ffn_cfg, self.dtype = shape, dtype
        ws = [torch.randn(inter, hidden) * 0.02, torch.randn(inter, hidden) * 0.02, torch.randn(hidden, inter) * 0.02]
        one = torch.cat([w.reshape(-1) for w in ws]).to(dtype) if self.quant is None else \
            quantize_expert(self.quant, *ws)
        self.host = huge_page_tensor((n_host, one.numel()), one.dtype)        # as the expert store holds them
        self.host.copy_(one.expand(n_host, -1))             # distinct addresses are what matters, not values
        self.registered = self.cuda and pin_in_place(self.host)
        if self.cuda and not self.registered:
            self.host = self.host.pin_memory()
        self.slots = torch.empty(GPU_GROUP, one.numel(), dtype=one.dtype, device=device)
        self.slot = self.slots[0]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.cpu_run = None             # the runtime's CPU-expert call (CpuExperts.run), set by measure()

    def close(self) -> None:
        """Undo the page-locking in place (before the memory goes), once no copy reads it."""
        if self.registered:
            torch.cuda.synchronize(self.device)
            torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
            self.registered = False

    def views(self, buf):
        if self.quant is not None:
            return split_planes(self.quant, buf)
        h, i = self.hidden, self.inter
        return buf[:2 * i * h].view(2 * i, h), buf[2 * i * h:].view(h, i)

    def fetch_ms(self, reps: int = 32) -> tuple[float, float]:
        """-> (ms per expert copied back to back, ms a lone copy takes on top of that). The executor issues a
        layer's copies together, so the PCIe lane's cost is a start plus the marginal copy: timed alone, a copy's
        time also held its issue by the host (0.168 ms against 0.123 per q4k expert back to back on the box's
        slow phase, eval/results/resident_h200), and the planner priced every fetch 37% high."""
        k = [0]

        def copies(n: int):
            def run():
                k[0] = (k[0] + n) % self.host.shape[0]           # distinct host experts, as a layer's misses
                src = [self.host[(k[0] + i) % self.host.shape[0]] for i in range(n)]
                if self.cuda:
                    with torch.cuda.stream(self.stream):
                        for i in range(n):
                            self.slots[i].copy_(src[i], non_blocking=True)
                    torch.cuda.current_stream().wait_stream(self.stream)
                else:
                    for i in range(n):
                        self.slots[i].copy_(src[i])
            return run
        one, group = copies(1), copies(GPU_GROUP)
        one(), group()
        alone, each = _median_ms(one, reps, self.cuda), _median_ms(group, reps, self.cuda) / GPU_GROUP
        return each, max(0.0, alone - each)

    def gpu_ms(self, n: int, reps: int = 20) -> float:
        """One expert of n tokens on the device, as the runtime runs it: the grouped FFN over GPU_GROUP slots of
        n rows each, per expert. The executor runs a layer's experts in groups (decode's hits and fetches, prefill's
        waves and scratch chunks of 8); one expert alone leaves most of the GPU idle (on the H200, q4k at 32-64
        rows: 0.30 ms alone, while mode gpu's whole 512-token prefill, 64 experts a layer, took 31 ms)."""
        from .resident import slot_ffn
        G = self.slots.shape[0]
        x = torch.randn(G * n, self.hidden, device=self.device).to(self.dtype)
        offs = torch.arange(n, G * n + 1, n, dtype=torch.int32, device=self.device)       # [G]
        if self.quant is not None and n >= SCRATCH_MIN_ROWS:      # as the executor runs prefill-sized groups
            scratch, ends = ScratchFFN(self.slots, self.quant, self.dtype, G), np.arange(n, G * n + 1, n)
            ffn = lambda x, _: scratch(x, ends)  # noqa: E731
        else:
            ffn = slot_ffn(self.slots, self.ffn_cfg, self.quant)
        ffn(x, offs)
        run = lambda: ffn(x, offs)  # noqa: E731
        if self.cuda and n <= GRAPH_TOKENS:                 # decode: the runtime replays it from a CUDA graph
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                ffn(x, offs)
            run = graph.replay
        return _median_ms(run, reps, self.cuda) / G

    def cpu_ms(self, n: int, experts: int = 1, reps: int = 24) -> float:
        """One call of the runtime's CPU path over `experts` distinct experts of n tokens each (weights from
        DRAM), on this thread as the runtime runs it: just after queueing expert copies, so the PCIe lane is busy."""
        x = torch.randn(n * experts, self.hidden).to(self.dtype)
        out = torch.empty_like(x)
        k = [0]

        def one():
            k[0] = (k[0] + experts) % (self.host.shape[0] - experts + 1)
            if self.cuda:
                self.queue_copies(2)
            views = [self.views(self.host[k[0] + j]) for j in range(experts)]
            t = time.perf_counter()
            self.cpu_run(x, out, [v[0] for v in views], [v[1] for v in views],
                         [j * n for j in range(experts)], [n] * experts)
            return 1000 * (time.perf_counter() - t)
        one()
        times = [one() for _ in range(reps)]
        if self.cuda:
            torch.cuda.synchronize()
        return statistics.median(times)

    def cpu_marginal_ms(self, n: int, experts: int = 16) -> float:
        """What one more expert of n tokens adds to a CPU-lane call: the lane runs a layer's CPU experts in one
        call, whose fixed part the engine measures as its dispatch cost. Measured over a batch-16-sized call:
        the first expert of a call costs more (0.33 vs 0.21 ms on the GPU box), which the dispatch part covers."""
        experts = max(2, min(experts, self.host.shape[0] - 1))
        one, many = self.cpu_ms(n, 1), self.cpu_ms(n, experts, reps=12)
        return max((many - one) / (experts - 1), 0.5 * one)

    def queue_copies(self, n: int) -> None:
        """Queue n expert copies on the copy stream and return at once."""
        with torch.cuda.stream(self.stream):
            for j in range(n):
                self.slot.copy_(self.host[(7 * j) % self.host.shape[0]], non_blocking=True)

    def xfer_ms(self, rows: int, reps: int = 20) -> float:
        x = torch.randn(rows, self.hidden, device=self.device).to(self.dtype)
        buf = torch.empty(rows, self.hidden, dtype=x.dtype, pin_memory=self.cuda)

        def one():
            buf.copy_(x, non_blocking=self.cuda)
            if self.cuda:
                torch.cuda.current_stream().synchronize()
            x.copy_(buf, non_blocking=self.cuda)
        return _median_ms(one, reps, self.cuda)


def measure(device: torch.device, hidden: int = 2048, inter: int = 1408, dtype: torch.dtype = torch.bfloat16,
            threads: int | None = None, tokens=TOKENS, n_host: int = 96, progress: bool = True,
            kernel: str = "auto", pool: bool = True, tiles: str = "auto", prefetch: bool = True,
            experts: str = "bf16", dot: str = "auto") -> CostModel:
    """Run every microbenchmark and fit the curves for experts in format `experts`; CPU experts run with the
    thread setting the runtime uses."""
    from .lanes import CpuLane
    bench = Bench(device, hidden, inter, dtype, n_host, experts)
    lane = CpuLane(threads, device.type == "cuda", kernel, pool, tiles, prefetch=prefetch, quant=bench.quant, dot=dot)
    bench.cpu_run = lane.experts.run
    steps = tqdm(total=3 * len(tokens) + 2, desc="calibrating", disable=not progress)
    try:
        fetch, latency = bench.fetch_ms()
        steps.update()
        gpu, cpu, xfer = {}, {}, {}
        for curve, measure_one in ((gpu, bench.gpu_ms), (cpu, bench.cpu_marginal_ms), (xfer, bench.xfer_ms)):
            for n in tokens:
                curve[n] = measure_one(n)
                steps.update()
        overhead = layer_overhead_ms(device, hidden)      # a first estimate; calibrate.py measures the runtime
        steps.update()
    finally:
        steps.close()
        bench.close()
    return CostModel(fetch_ms=fetch, gpu_ms=Curve.fit(gpu), cpu_ms=Curve.fit(cpu), xfer_ms=Curve.fit(xfer),
                     layer_overhead_ms=overhead, fetch_latency_ms=latency,
                     fingerprint=fingerprint(device, threads or lane.threads, lane.experts.label, experts),
                     source="calibrated")


def layer_overhead_ms(device: torch.device, hidden: int, experts: int = 64, k: int = 6, reps: int = 50) -> float:
    """Routing, the host sync and the bookkeeping of one MoE layer at batch 1, without any expert work."""
    import numpy as np
    gate = torch.randn(experts, hidden, device=device)
    x = torch.randn(1, hidden, device=device)

    def one():
        idx = torch.softmax(x @ gate.T, -1).topk(k).indices
        host = idx.cpu().numpy().reshape(-1)
        perm = torch.from_numpy(np.argsort(host, kind="stable")).to(device)
        torch.zeros_like(x).index_add_(0, perm // k, x.index_select(0, perm // k))
    one()
    cuda = device.type == "cuda"
    t = []
    for _ in range(reps):
        s = time.perf_counter()
        one()
        if cuda:
            torch.cuda.synchronize()
        t.append(1000 * (time.perf_counter() - s))
    return statistics.median(t)

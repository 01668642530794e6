"""Do the CPU lane and the PCIe lane fight, and over what? Times 1-token CPU experts on a lane thread (as the runtime
runs them) for several thread counts, alone and while the copy stream streams experts to the GPU, issued either as
one large copy at a time (DMA only, almost no CPU) or per expert with events (as the executor does). Also times the
calls spaced out like a decode step (one call per ~1 ms) to expose thread wake-up costs. One JSON line per setting.

    python eval/lane_probe.py [--threads 15,14,12,8] [--out probe.json]"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from hybrid.cpu_experts import run_cpu_experts  # noqa: E402
from hybrid.lanes import CpuLane  # noqa: E402

H, I, N_HOST = 2048, 1408, 96
NUMEL = 3 * H * I


class Loader:
    """Streams experts host -> GPU on a side stream from its own thread until stopped; counts bytes moved."""

    def __init__(self, host: torch.Tensor, style: str):
        self.host, self.style = host, style
        self.dev = torch.empty(8, NUMEL, dtype=host.dtype, device="cuda")
        self.stream = torch.cuda.Stream()
        self.stop, self.moved = threading.Event(), 0
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        k = 0
        while not self.stop.is_set():
            with torch.cuda.stream(self.stream):
                if self.style == "dma":
                    src = self.host[k % (N_HOST - 8):][:8]
                    self.dev.copy_(src, non_blocking=True)
                    self.moved += 8
                else:
                    evs = []
                    for j in range(8):
                        self.dev[j].copy_(self.host[(k + j) % N_HOST], non_blocking=True)
                        ev = torch.cuda.Event()
                        ev.record(self.stream)
                        evs.append(ev)
                    self.moved += 8
            self.stream.synchronize()
            k += 8

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.gbps = self.moved * NUMEL * 2 / (time.perf_counter() - self.t0) / 1e9


def time_calls(host: torch.Tensor, experts_per_call: int, calls: int, gap_ms: float) -> float:
    """Median ms per expert over `calls` calls of `experts_per_call` distinct experts each (runs on the lane)."""
    x = torch.randn(experts_per_call, H).to(host.dtype)
    out = torch.empty_like(x)
    times, k = [], 0
    for _ in range(calls):
        js = [(k + j) % N_HOST for j in range(experts_per_call)]
        k += experts_per_call
        w13 = [host[j][:2 * I * H].view(2 * I, H) for j in js]
        w2 = [host[j][2 * I * H:].view(H, I) for j in js]
        t = time.perf_counter()
        run_cpu_experts(x, out, w13, w2, list(range(experts_per_call)), [1] * experts_per_call)
        times.append((time.perf_counter() - t) / experts_per_call)
        if gap_ms:
            end = time.perf_counter() + gap_ms / 1000
            while time.perf_counter() < end:
                time.sleep(0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", default="15,14,12,8")
    ap.add_argument("--main-threads", type=int, default=None,
                    help="OpenMP threads of the main thread before it touches torch (default: torch's choice)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.main_threads:
        torch.set_num_threads(a.main_threads)
    cuda = torch.cuda.is_available()
    host = (torch.randn(N_HOST, NUMEL) * 0.02).bfloat16()
    host = host.pin_memory() if cuda else host
    rows = []
    env = {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "KMP_"))}
    for threads in [int(t) for t in a.threads.split(",")]:
        lane = CpuLane(threads, pin=cuda)
        for load in ("none", "dma", "per_expert") if cuda else ("none",):
            for per_call, gap in ((1, 0.0), (1, 1.0), (4, 0.0), (4, 1.0)):
                ctx = Loader(host, load) if load != "none" else None
                if ctx:
                    ctx.__enter__()
                ms = lane.submit(time_calls, host, per_call, 64, gap).result()
                gbps = 0.0
                if ctx:
                    ctx.__exit__()
                    gbps = ctx.gbps
                row = {"threads": threads, "load": load, "experts_per_call": per_call, "gap_ms": gap,
                       "cpu_ms_per_expert": round(ms, 4), "pcie_gb_s": round(gbps, 1), "env": env,
                       "main_threads": torch.get_num_threads()}
                rows.append(row)
                print(json.dumps(row), flush=True)
        lane.pool.shutdown()
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

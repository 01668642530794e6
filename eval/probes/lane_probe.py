"""Where should CPU experts run? Times 1- and 4-expert calls (1 token each, distinct experts from DRAM), seen from
the thread that drives the GPU, while the copy stream moves experts to the GPU:

  inline  the driving thread queues the copies, then computes the experts on its own OpenMP team (the runtime)
  worker  the driving thread (one OpenMP thread) hands the call to a worker thread with its own team, as a
          separate CPU lane would, and waits for the result: the hand-off is included

Calls are spaced ~1 ms apart, as MoE layers are in a decode step. One JSON line per setting.

    python eval/probes/lane_probe.py [--threads 16,15,12] [--out probe.json]"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from hybrid.kernels.cpu_experts import CpuExperts  # noqa: E402

H, I, N_HOST = 2048, 1408, 96
NUMEL = 3 * H * I
KERNEL = CpuExperts("auto")


def call(host: torch.Tensor, x: torch.Tensor, out: torch.Tensor, first: int) -> None:
    js = [(first + j) % N_HOST for j in range(x.shape[0])]
    KERNEL.run(x, out, [host[j][:2 * I * H].view(2 * I, H) for j in js],
                    [host[j][2 * I * H:].view(H, I) for j in js], list(range(x.shape[0])), [1] * x.shape[0])


def timed(host, dev, stream, per_call: int, run, calls: int = 48) -> tuple[float, float]:
    """(median ms per expert seen by the caller, GB/s the copy stream moved meanwhile)."""
    x = torch.randn(per_call, H).to(host.dtype)
    out = torch.empty_like(x)
    times, moved, t_all = [], 0, time.perf_counter()
    for c in range(calls):
        if stream is not None:
            with torch.cuda.stream(stream):
                for j in range(2):
                    dev.copy_(host[(5 * c + j) % N_HOST], non_blocking=True)
            moved += 2
        t = time.perf_counter()
        run(lambda: call(host, x, out, c * per_call))
        times.append((time.perf_counter() - t) / per_call)
        end = time.perf_counter() + 1e-3
        while time.perf_counter() < end:
            pass
    if stream is not None:
        stream.synchronize()
    gbps = moved * NUMEL * 2 / (time.perf_counter() - t_all) / 1e9
    return 1000 * statistics.median(times), gbps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", default="16,15,12")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    host = torch.empty(N_HOST, NUMEL, dtype=torch.bfloat16, pin_memory=cuda)
    host.copy_((torch.randn(NUMEL) * 0.02).bfloat16().expand(N_HOST, NUMEL))
    dev = torch.empty(NUMEL, dtype=host.dtype, device="cuda") if cuda else None
    stream = torch.cuda.Stream() if cuda else None
    rows = []
    for threads in [int(t) for t in a.threads.split(",")]:
        pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,))
        for where in ("inline", "worker"):
            torch.set_num_threads(threads if where == "inline" else 1)
            run = (lambda f: f()) if where == "inline" else (lambda f: pool.submit(f).result())
            for per_call in (1, 4):
                ms, gbps = timed(host, dev, stream, per_call, run)
                row = {"threads": threads, "where": where, "experts_per_call": per_call,
                       "cpu_ms_per_expert": round(ms, 4), "pcie_gb_s": round(gbps, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        pool.shutdown()
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

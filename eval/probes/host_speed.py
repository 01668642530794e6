"""How fast is this machine's host at the small steps an offloaded layer's critical path is made of? Clock, load,
and the median time of three fixed workloads, so that runs on different machines can be told apart: at batch 1
the engine's speed follows its host time per offloaded layer (eval/results/recheck_h200: one lease's host took 2x
the previous one's in every phase, and decoded 1.6x slower where llama.cpp ran 1.1x slower). One JSON object.

    python eval/probes/host_speed.py [--out host.json] [--line]"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eval.common import meta  # noqa: E402


def median_us(fn, reps: int = 2000, rounds: int = 5) -> float:
    """The median over rounds of the mean microseconds per call."""
    fn()
    per = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        per.append(1e6 * (time.perf_counter() - t) / reps)
    return round(statistics.median(per), 3)


def routing_like(ids: np.ndarray) -> dict[int, int]:
    """What the executor does with a layer's routing at batch 1: counts, the experts used, a dict of them."""
    counts = np.bincount(ids, minlength=64)
    nz = np.flatnonzero(counts)
    return dict(zip(nz.tolist(), counts[nz].tolist()))


def python_like() -> int:
    """Plain Python: a plan's list and dict work."""
    tokens = {e: 1 for e in range(0, 60, 10)}
    cached = {10, 30}
    hits = [e for e in tokens if e in cached]
    miss = sorted((e for e in tokens if e not in cached), key=lambda e: tokens[e])
    return len(hits) + len(miss)


def measure() -> dict:
    ids = np.array([3, 17, 22, 40, 51, 63], dtype=np.int64)
    x, idx = torch.randn(4, 2048, dtype=torch.bfloat16), torch.tensor([1])
    return {"cpus": os.cpu_count(),
            "python_plan_us": median_us(python_like),
            "numpy_routing_us": median_us(lambda: routing_like(ids)),
            "torch_index_select_us": median_us(lambda: x.index_select(0, idx))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    ap.add_argument("--line", action="store_true", help="print one line of the host's figures, not the JSON")
    a = ap.parse_args()
    out = {**meta(), **measure()}
    text = json.dumps(out, indent=1)
    if a.line:
        keys = ("cpu_mhz_mean", "loadavg", "python_plan_us", "numpy_routing_us", "torch_index_select_us")
        text = "host: " + json.dumps({k: out[k] for k in keys})
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

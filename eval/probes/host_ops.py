"""Host cost of the CUDA calls an offloaded MoE layer makes, in microseconds of the driving thread (GPU idle):
what the per-layer host path is built from. One JSON object.

    python eval/probes/host_ops.py [--out host_ops.json]"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def us(fn, reps: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    per = 1e6 * (time.perf_counter() - t) / reps
    torch.cuda.synchronize()
    return round(per, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out")
    a = ap.parse_args()
    side = torch.cuda.Stream()
    src = torch.empty(1 << 16, dtype=torch.bfloat16, pin_memory=True)
    dst = torch.empty(1 << 16, dtype=torch.bfloat16, device="cuda")
    small = torch.zeros(8, device="cuda")
    ev = torch.cuda.Event()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        small.add_(1)
    torch.cuda.current_stream().wait_stream(s)
    with torch.cuda.graph(g):
        small.add_(1)

    def in_stream():
        with torch.cuda.stream(side):
            pass

    def copy_side():
        with torch.cuda.stream(side):
            dst.copy_(src, non_blocking=True)

    def sync_small():
        small.cpu()

    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "stream_context_us": us(in_stream),
           "copy_128KB_non_blocking_us": us(lambda: dst.copy_(src, non_blocking=True)),
           "copy_on_side_stream_us": us(copy_side), "event_record_us": us(lambda: ev.record()),
           "new_event_and_record_us": us(lambda: torch.cuda.Event().record()),
           "wait_event_us": us(lambda: torch.cuda.current_stream().wait_event(ev)),
           "graph_replay_1_kernel_us": us(g.replay), "eager_add_us": us(lambda: small.add_(1)),
           "sync_read_8_floats_us": us(sync_small, 500)}
    print(json.dumps(res))
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

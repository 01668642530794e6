"""Does the CPU expert lane slow down after large-batch work? 1-token experts timed before and after
64- and 512-token experts, on the lane thread as the runtime runs it. Prints one line per phase.

    python eval/cpu_lane_probe.py            (compare with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 to rule AMX out)"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import torch  # noqa: E402

from hybrid.cpu_experts import run_cpu_experts  # noqa: E402
from hybrid.lanes import CpuLane  # noqa: E402

H, I, N_EXPERTS = 2048, 1408, 64


def phase(lane: CpuLane, w13, w2, tokens: int, reps: int) -> float:
    def work() -> float:
        x = torch.randn(tokens * 4, H).bfloat16()
        out = torch.empty_like(x)
        times = []
        for r in range(reps):
            js = [(4 * r + k) % N_EXPERTS for k in range(4)]
            t = time.perf_counter()
            run_cpu_experts(x, out, [w13[j] for j in js], [w2[j] for j in js],
                            [k * tokens for k in range(4)], [tokens] * 4)
            times.append((time.perf_counter() - t) / 4)
        return 1000 * statistics.median(times)
    return lane.submit(work).result()


def main() -> None:
    w13 = [torch.randn(2 * I, H).bfloat16() * 0.02 for _ in range(N_EXPERTS)]
    w2 = [torch.randn(H, I).bfloat16() * 0.02 for _ in range(N_EXPERTS)]
    lane = CpuLane(pin=True)
    out = {"isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "default"), "threads": lane.threads}
    for name, tokens, reps in (("1tok_fresh", 1, 64), ("1tok_again", 1, 64), ("64tok", 64, 8),
                               ("1tok_after64", 1, 64), ("512tok", 512, 4), ("1tok_after512", 1, 64),
                               ("1tok_later", 1, 64)):
        out[name] = round(phase(lane, w13, w2, tokens, reps), 4)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

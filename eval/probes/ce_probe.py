"""Does a small copy on the compute stream wait behind expert copies queued on another stream? Queues `--experts`
expert-sized host-to-device copies on a side stream, then on the compute stream times (CUDA events) small
transfers of each size: host-to-device (a pinned copy, or a kernel reading pinned memory in place through
`device_alias`) and device-to-host (to pinned memory, to pageable memory as `.cpu()` does, or a
kernel writing pinned memory in place), each with and without the expert copies in flight. One JSON line per size.
Measured on the H200 box (session 8): nothing waits here. But a prefill trace (session 9, eval/probes/prefill_trace.py
timeline) showed the engine's CPU-results copy waiting behind copies made ahead: this probe, which queues its
copies at once from an idle device, does not reproduce what the engine does (see eval/NOTES.md, 001).

    python eval/probes/ce_probe.py [--experts 6] [--sizes-kib 4,256,1024] [--out probe.json]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from hybrid.offload.calibration import _median_ms  # noqa: E402
from eval.common import meta  # noqa: E402

EXPERT_BYTES = 3 * 2048 * 1408 * 2


class _Interface:                      # what torch.as_tensor reads to wrap foreign device memory
    def __init__(self, t: torch.Tensor):
        self.__cuda_array_interface__ = {"shape": tuple(t.shape), "typestr": "<i2", "data": (t.data_ptr(), False),
                                         "version": 3, "strides": None}


def device_alias(t: torch.Tensor) -> torch.Tensor:
    """A CUDA tensor over the same page-locked host memory as bf16 `t` (unified addressing: one address for host
    and device), so that a kernel reads or writes it in place over PCIe, without a copy engine."""
    return torch.as_tensor(_Interface(t), device="cuda").view(torch.bfloat16)


def timed(op, side: torch.cuda.Stream, big: list, reps: int = 9) -> float:
    """Median ms from queueing `op` on the compute stream to its end, with `big` copies queued first on `side`."""
    def queue_big():
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            for dst, src in big:
                dst.copy_(src, non_blocking=True)
    ms = _median_ms(op, reps, True, before=queue_big)
    torch.cuda.synchronize()
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=6)
    ap.add_argument("--sizes-kib", default="4,256,1024")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("ce_probe needs CUDA")
    n = EXPERT_BYTES // 2
    big = [(torch.empty(n, dtype=torch.bfloat16, device="cuda"), torch.randn(n).bfloat16().pin_memory())
           for _ in range(a.experts)]
    side, rows = torch.cuda.Stream(), []
    for kib in [int(s) for s in a.sizes_kib.split(",")]:
        host = torch.randn(kib * 512).bfloat16().pin_memory()
        alias, dst = device_alias(host), torch.empty(kib * 512, dtype=torch.bfloat16, device="cuda")
        src = torch.randn(kib * 512, device="cuda").bfloat16()
        ops = {"copy": lambda: dst.copy_(host, non_blocking=True), "in_place": lambda: torch.mul(alias, 1, out=dst),
               "d2h_pinned": lambda: host.copy_(src, non_blocking=True), "d2h_pageable": lambda: src.cpu(),
               "d2h_in_place": lambda: torch.mul(src, 1, out=alias)}
        row = {"kib": kib, "expert_copies_queued": a.experts}
        for name, op in ops.items():
            row[f"{name}_alone_ms"] = round(timed(op, side, []), 4)
            row[f"{name}_behind_copies_ms"] = round(timed(op, side, big), 4)
        torch.cuda.synchronize()
        assert torch.equal(host, src.cpu())
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps({**meta(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

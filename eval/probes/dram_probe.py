"""The host memory's read ceiling, which bounds both lanes together: GB/s that N threads reach streaming through
a pinned buffer far larger than the L3 (each thread its own contiguous slice, summed with 64-byte vector loads
where the CPU has AVX-512), alone and while a side stream copies experts to the GPU (the PCIe lane reads the same
memory; its GB/s meanwhile too). Compare with kernel_probe.py's weight bytes per second of the expert kernels.
One JSON line per setting.

    python eval/probes/dram_probe.py [--threads 1,4,8,14,15,16] [--gib 4] [--out dram.json]"""
from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SOURCE = r"""
#include <cstdint>
#include <omp.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
extern "C" double read_sum(const uint64_t *p, long words, int threads) {
    double total = 0;
#pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const long lo = words * t / n / 32 * 32, hi = words * (t + 1) / n / 32 * 32;
#ifdef __AVX512F__
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
        for (long i = lo; i < hi; i += 32) {
            a0 = _mm512_add_epi64(a0, _mm512_load_si512(p + i));
            a1 = _mm512_add_epi64(a1, _mm512_load_si512(p + i + 8));
            a2 = _mm512_add_epi64(a2, _mm512_load_si512(p + i + 16));
            a3 = _mm512_add_epi64(a3, _mm512_load_si512(p + i + 24));
        }
        total += (double)_mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
#else
        uint64_t a = 0;
        for (long i = lo; i < hi; i++) a += p[i];
        total += (double)a;
#endif
    }
    return total;
}
"""


def build() -> ctypes.CDLL:
    d = Path(tempfile.mkdtemp())
    (d / "r.cpp").write_text(SOURCE)
    subprocess.run(["g++", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(d / "r.cpp"), "-o",
                    str(d / "r.so")], check=True)
    lib = ctypes.CDLL(str(d / "r.so"))
    lib.read_sum.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_int]
    lib.read_sum.restype = ctypes.c_double
    return lib


def gb_s(lib, buf: torch.Tensor, threads: int, copying: bool, host, dev, stream, reps: int = 5):
    """-> (read GB/s, copy GB/s over the read or None): medians of `reps` passes."""
    reads, copies = [], []
    for _ in range(reps):
        if copying:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            with torch.cuda.stream(stream):
                ev[0].record()
                for j in range(60):                                 # ~19 ms of copies: about one pass
                    dev.copy_(host[j % host.shape[0]], non_blocking=True)
                ev[1].record()
        t = time.perf_counter()
        lib.read_sum(buf.data_ptr(), buf.numel() // 8, threads)
        reads.append(time.perf_counter() - t)
        if copying:
            stream.synchronize()
            copies.append(60 * host[0].nbytes / ev[0].elapsed_time(ev[1]) / 1e6)
    return buf.numel() / statistics.median(reads) / 1e9, statistics.median(copies) if copies else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", default="1,4,8,14,15,16")
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    lib = build()
    buf = torch.ones(int(a.gib * 2**30), dtype=torch.uint8, pin_memory=cuda)
    host = torch.ones(8, 3 * 2048 * 1408, dtype=torch.bfloat16, pin_memory=cuda) if cuda else None
    dev = torch.empty(host.shape[1], dtype=host.dtype, device="cuda") if cuda else None
    stream = torch.cuda.Stream() if cuda else None
    rows = []
    for n in [int(t) for t in a.threads.split(",")]:
        row = {"threads": n, "read_gb_s": round(gb_s(lib, buf, n, False, host, dev, stream)[0], 1)}
        if cuda:
            r, c = gb_s(lib, buf, n, True, host, dev, stream)
            row.update(read_gb_s_while_copying=round(r, 1), copy_gb_s_while_reading=round(c, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())

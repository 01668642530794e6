"""This checkout's native CPU kernel against a git revision's (the same entry points), alternating on one machine:
both builds run the same calls round after round, so the machine's drift falls on both. Experts of V2-Lite's shape,
`--per-call` per call, at `--tokens` per expert, from `--distinct` experts (1: its weights stay in cache, one core's
compute; 48: from DRAM). One JSON object with a row per format, distinct, tokens; a table at the end.

    python eval/probes/kernel_ab.py --base HEAD~1 [--formats q8,q4k,q4 --dot auto --threads 1 --out ab.json]
    python eval/probes/kernel_ab.py --base .kbase --threads 15 --distinct 96 --per-call 6   # sources in .kbase/"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from eval.common import ROOT, meta  # noqa: E402
from eval.probes.quant_kernel_probe import CFG, H, expert_views, slots_for  # noqa: E402
from hybrid.kernels import cpu_kernel  # noqa: E402
from hybrid.kernels.cpu_experts import CpuExperts  # noqa: E402
from hybrid.model.quant import layout  # noqa: E402


def base_library(base: str, folder: Path):
    """The kernel as it was at git revision `base` (or from its sources in the folder `base`), built in `folder`."""
    src = Path(base)
    if not src.is_dir():
        src = folder
        for f in [cpu_kernel.SOURCE, *cpu_kernel.HEADERS]:
            text = subprocess.run(["git", "show", f"{base}:{f.relative_to(ROOT).as_posix()}"], cwd=ROOT,
                                  capture_output=True, text=True)
            if text.returncode == 0:
                (folder / f.name).write_text(text.stdout)
    return cpu_kernel.load(path=cpu_kernel.build(folder / "base.so", source=src / cpu_kernel.SOURCE.name))


def time_calls(k: CpuExperts, views, tokens: int, per_call: int, calls: int = 20) -> float:
    """Median us per expert over `calls` calls of `per_call` experts each, cycling through `views`."""
    x = torch.randn(tokens * per_call, H).bfloat16()
    out, times = torch.empty_like(x), []
    for c in range(calls):
        js = [(per_call * c + j) % len(views) for j in range(per_call)]
        t = time.perf_counter()
        k.run(x, out, [views[j][0] for j in js], [views[j][1] for j in js], [j * tokens for j in range(per_call)],
              [tokens] * per_call)
        times.append(time.perf_counter() - t)
    return 1e6 * statistics.median(times[2:]) / per_call


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision of the kernel to compare against, or a folder "
                    "holding its sources")
    ap.add_argument("--formats", default="q8,q4k,q4")
    ap.add_argument("--dot", default="auto", choices=["auto", "off"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--distinct", default="1,48")
    ap.add_argument("--tiles", default="off", choices=["auto", "off"], help="the tile path (AMX), which quantized "
                    "calls take above 8 tokens per expert")
    ap.add_argument("--tokens", default="1,4")
    ap.add_argument("--per-call", type=int, default=1, help="experts per kernel call")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--out", default="kernel_ab.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"base": base_library(a.base, Path(tmp)), "this": cpu_kernel.load()}
        for fmt in a.formats.split(","):
            quant = None if fmt == "bf16" else layout(CFG, fmt)
            kernels = {}
            for name, lib in libs.items():
                kernels[name] = CpuExperts("native", pool_threads=a.threads - 1, quant=quant, tiles=a.tiles,
                                           max_tokens=1 << 30, dot=a.dot)
                kernels[name].lib = lib
            for distinct in map(int, a.distinct.split(",")):
                views = expert_views(quant, slots_for(fmt, distinct, "cpu"))
                for tokens in map(int, a.tokens.split(",")):
                    us = {name: [] for name in libs}
                    for _ in range(a.rounds):
                        for name in libs:
                            us[name].append(time_calls(kernels[name], views, tokens, a.per_call))
                    med = {name: statistics.median(v) for name, v in us.items()}
                    rows.append({"format": fmt, "distinct": distinct, "tokens": tokens, "base_us": med["base"],
                                 "this_us": med["this"], "ratio": med["this"] / med["base"], "rounds": us})
    Path(a.out).write_text(json.dumps({**meta(), "base": a.base, "dot": a.dot, "tiles": a.tiles, "threads": a.threads,
                                      "per_call": a.per_call, "rows": rows},
                                      indent=1))
    print("format distinct tokens  base us  this us  this/base   (us per expert)")
    for r in rows:
        print(f"{r['format']:6} {r['distinct']:8} {r['tokens']:6} {r['base_us']:8.0f} {r['this_us']:8.0f} "
              f"{r['ratio']:10.3f}")


if __name__ == "__main__":
    main()

"""GPU time of the graph pieces of one decode step, replayed alone: the attention piece between two MoE layers,
the first and last pieces, and an offloaded layer's expert graphs (hits, fetched, post); with --kernels, the
kernels of one attention piece by GPU time (torch.profiler).

    python eval/probes/piece_times.py --model DIR --mode hybrid --gpu-memory 12GiB --batch-size 16 [--out x.json]"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eval.common import meta, probe_args, probe_engine  # noqa: E402
from hybrid.engine.sampling import SamplingParams  # noqa: E402


def replay_ms(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """Mean GPU time of one replay, over `reps` back-to-back replays."""
    graph.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def kernel_table(graph: torch.cuda.CUDAGraph, reps: int, top: int = 25) -> tuple[list[dict], dict]:
    """-> the `top` kernels of one replay by GPU time, and the totals over all of them (launches, us)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:90], "calls_per_replay": e.count / reps,
             "us_per_replay": e.device_time_total / reps} for e in prof.key_averages()
            if e.device_time_total > 0]
    totals = {"launches": sum(r["calls_per_replay"] for r in rows), "us": sum(r["us_per_replay"] for r in rows)}
    return sorted(rows, key=lambda r: -r["us_per_replay"])[:top], totals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    probe_args(ap)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--kernels", action="store_true", help="also list the kernels of one attention piece")
    ap.add_argument("--top", type=int, default=25, help="kernels listed with --kernels")
    a = ap.parse_args()
    engine, prompt = probe_engine(a)
    engine.generate(prompt, SamplingParams(max_new_tokens=4))                    # captures the decode graphs
    step = engine.decoder.steps[a.batch_size]
    pieces = [replay_ms(g, a.reps) for g in step.pieces]
    report = {**meta(), "mode": a.mode, "batch_size": a.batch_size, "pieces_ms": pieces}
    if len(pieces) > 2:
        report["attention_piece_ms"] = statistics.median(pieces[1:-1])
        print(f"bs {a.batch_size} {a.mode}: first piece {pieces[0]:.3f} ms, attention piece median "
              f"{report['attention_piece_ms']:.3f} (min {min(pieces[1:-1]):.3f}, max {max(pieces[1:-1]):.3f}), "
              f"last {pieces[-1]:.3f}, sum {sum(pieces):.2f} ms")
    else:
        print(f"bs {a.batch_size} {a.mode}: whole step {sum(pieces):.3f} ms")
    layer_graphs = list(getattr(engine.backend, "graphs", {}).values())
    if layer_graphs:
        g = layer_graphs[len(layer_graphs) // 2].graphs
        report["layer_graph_ms"] = {k: replay_ms(v, a.reps) for k, v in g.items()}
        print("  expert graphs of one layer (ms):", {k: round(v, 4) for k, v in report["layer_graph_ms"].items()})
    if a.kernels:
        target = step.pieces[len(step.pieces) // 2]
        report["kernels"], report["kernel_totals"] = kernel_table(target, 10, a.top)
        t = report["kernel_totals"]
        print(f"  piece {len(step.pieces) // 2}: {t['launches']:.0f} kernels, {t['us']:.1f} us of kernel time; top:")
        for r in report["kernels"]:
            print(f"    {r['us_per_replay']:8.2f} us  x{r['calls_per_replay']:.0f}  {r['kernel']}")
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    from hybrid.engine.errors import friendly
    friendly(main)

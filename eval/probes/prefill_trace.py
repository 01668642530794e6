"""Where does an offloaded prefill spend its time? One prefill under torch.profiler (CUDA activity) with the
executor's phase log on: per MoE layer, when routing reached the host, when the PCIe lane moved that layer's
experts, when the CPU lane ran, and how busy each lane was over the whole prefill. With --decode-steps N the
trace goes on for N decode steps, summarised as the mean decode layer (the PCIe lane's idle time per layer).

    python eval/probes/prefill_trace.py --model DIR --mode hybrid --gpu-memory 12GiB --prompt-len 256 [--out x.json]
    python eval/probes/prefill_trace.py --model DIR --mode hybrid --gpu-memory 12GiB --batch-size 16 --decode-steps 4"""
from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from eval.common import meta, probe_args, probe_engine  # noqa: E402
from hybrid.engine.sampling import SamplingParams  # noqa: E402
from hybrid.offload.phases import MARKS  # noqa: E402

BIG_COPY = 1 << 20          # bytes: an expert copy, not an index or activation upload


def busy_ms(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Length (ms) of the union of [a, b) spans (us) clipped to [lo, hi)."""
    total, end = 0.0, lo
    for a, b in sorted(spans):
        a, b = max(a, end), min(b, hi)
        if b > a:
            total += b - a
            end = b
    return total / 1000


def traced_prefill(engine, prompt, decode_steps: int = 0) -> tuple[list[dict], list[dict], float, dict]:
    """-> (trace events, phase-log rows, offset us that maps perf_counter seconds onto trace timestamps,
    the phase log's summary)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    log = engine.backend.phases
    log.enabled, log.rows = True, []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        torch.cuda.synchronize()
        t_mark = time.perf_counter()
        with record_function("prefill_trace_mark"):
            pass
        engine.generate(prompt, SamplingParams(max_new_tokens=1 + decode_steps, stop_on_eos=False))
        torch.cuda.synchronize()
    log.enabled = False
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        events = json.loads(Path(f.name).read_text())["traceEvents"]
    mark = next(e for e in events if e.get("name") == "prefill_trace_mark")
    return events, log.rows, float(mark["ts"]) - 1e6 * t_mark, log.summary()


def analyse(events: list[dict], rows: list[dict], offset: float) -> dict:
    us = lambda t: 1e6 * t + offset  # noqa: E731  (perf_counter s -> trace us)
    copies = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "gpu_memcpy"
                    and "HtoD" in e.get("name", "") and e.get("args", {}).get("bytes", 0) >= BIG_COPY)
    kernels = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "kernel"]
    lo = us(rows[0]["enter"]) if rows else 0.0
    hi = max([b for _, b in kernels] + [us(r["done"]) for r in rows if "done" in r])
    cpu = [(us(r["cpu_start"]), us(r["cpu_end"])) for r in rows if "cpu_end" in r]
    layers = []
    for r, nxt in zip(rows, rows[1:] + [None]):
        a, b = us(r["routed"]), (us(nxt["routed"]) if nxt else hi)
        mine = [(s, e) for s, e in copies if a <= s < b]
        layers.append({"layer": r["layer"], "routed_ms": (a - lo) / 1000, "n_hit": r.get("n_hit", 0),
                       "n_ahead": r.get("n_ahead", 0),
                       "n_fetch": r.get("n_fetch", 0), "n_cpu": r.get("n_cpu", 0),
                       "first_copy_ms": (mine[0][0] - a) / 1000 if mine else None,
                       "copies_ms": busy_ms(mine, a, b), "copies_end_ms": (mine[-1][1] - a) / 1000 if mine else None,
                       "cpu_start_ms": (us(r["cpu_start"]) - a) / 1000 if "cpu_start" in r else None,
                       "cpu_ms": (us(r["cpu_end"]) - us(r["cpu_start"])) / 1000 if "cpu_end" in r else None,
                       "host_done_ms": (us(r["done"]) - a) / 1000, "span_ms": (b - a) / 1000})
    first_moe = us(rows[0]["enter"]) if rows else lo
    return {"moe_span_ms": (hi - first_moe) / 1000, "copies": len(copies),
            "pcie_busy_ms": busy_ms(copies, first_moe, hi), "gpu_kernels_busy_ms": busy_ms(kernels, first_moe, hi),
            "cpu_lane_busy_ms": busy_ms(cpu, first_moe, hi), "layers": layers}


def host_ops(events: list[dict], windows: list[tuple[float, float]], top: int = 12) -> dict:
    """The driving thread's CPU ops and CUDA runtime calls inside the windows (us, sorted, disjoint), by total time
    per window (nested ops count in their parents too)."""
    if not windows:
        return {}
    mark = next(e for e in events if e.get("name") == "prefill_trace_mark")
    starts = [a for a, _ in windows]
    total: dict[tuple[str, str], list] = {}
    for e in events:
        if e.get("ph") != "X" or e.get("tid") != mark.get("tid") or e.get("cat") not in ("cpu_op", "cuda_runtime",
                                                                                          "cuda_driver"):
            continue
        i = bisect.bisect_right(starts, e["ts"]) - 1
        if i >= 0 and e["ts"] < windows[i][1]:
            t = total.setdefault((e["cat"], e["name"]), [0.0, 0])
            t[0] += e.get("dur", 0.0)
            t[1] += 1
    n = len(windows)
    ranked = sorted(total.items(), key=lambda kv: -kv[1][0])[:top]
    return {"mean_window_ms": sum(b - a for a, b in windows) / n / 1000, "layers": n,
            "top": [{"cat": c, "name": m, "ms_per_layer": t / n / 1000, "calls_per_layer": k / n}
                    for (c, m), (t, k) in ranked]}


def host_gap(events: list[dict], rows: list[dict], offset: float) -> dict:
    """From one MoE layer's end on the host (`done`) to the next layer's start (`enter`): host_ops there."""
    us = lambda t: 1e6 * t + offset  # noqa: E731
    return host_ops(events, [(us(r["done"]), us(n["enter"])) for r, n in zip(rows, rows[1:])
                             if "done" in r and "enter" in n])


def host_in_layer(events: list[dict], rows: list[dict], offset: float) -> dict:
    """From a MoE layer's routing on the host to its end (`routed` -> `done`: plan, copies, the GPU side's
    launches, the CPU lane's join): host_ops there."""
    us = lambda t: 1e6 * t + offset  # noqa: E731
    return host_ops(events, [(us(r["routed"]), us(r["done"])) for r in rows if "routed" in r and "done" in r])


def timeline(events: list[dict], rows: list[dict], offset: float, which: tuple[int, ...] = (5, 6)) -> list[dict]:
    """Layers `which` (indices into the MoE layers) in full, ms after their routing: the host's phase marks, and
    every GPU kernel, copy and memset up to the next routing with its stream (`tid`) and size."""
    us = lambda t: 1e6 * t + offset  # noqa: E731
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    out = []
    for i in which:
        if i + 1 >= len(rows):
            continue
        a, b = us(rows[i]["routed"]), us(rows[i + 1]["routed"])
        marks = {k: (us(v) - a) / 1000 for k, v in rows[i].items() if k in MARKS}
        notes = {k: v for k, v in rows[i].items() if k not in MARKS and k != "layer"}      # counts, lane state
        ops = [{"t": round((e["ts"] - a) / 1000, 4), "dur": round(e.get("dur", 0) / 1000, 4), "stream": e.get("tid"),
                "name": e["name"][:48], "bytes": e.get("args", {}).get("bytes")}
               for e in sorted(gpu, key=lambda e: e["ts"]) if a <= e["ts"] < b]
        out.append({"layer": rows[i]["layer"], "span_ms": (b - a) / 1000, "host_marks_ms": marks, "notes": notes,
                    "gpu": ops})
    return out


def table(res: dict) -> None:
    span = res["moe_span_ms"]
    print(f"MoE layers span {span:.1f} ms | PCIe busy {res['pcie_busy_ms']:.1f} ({res['copies']} copies) | "
          f"GPU kernels busy {res['gpu_kernels_busy_ms']:.1f} | CPU lane busy {res['cpu_lane_busy_ms']:.1f} ms")
    print("layer  hit (ahead) fetch cpu | 1st copy  copies  copies end | cpu start  cpu ms | host done  span (ms after routing)")
    f = lambda v: "   -  " if v is None else f"{v:6.2f}"  # noqa: E731
    for r in res["layers"]:
        print(f"{r['layer']:5d} {r['n_hit']:4d} ({r['n_ahead']:2d}) {r['n_fetch']:5d} {r['n_cpu']:3d} | {f(r['first_copy_ms'])}  "
              f"{f(r['copies_ms'])}  {f(r['copies_end_ms'])}    | {f(r['cpu_start_ms'])}  {f(r['cpu_ms'])} | "
              f"{f(r['host_done_ms'])}  {f(r['span_ms'])}")
    spans = [r["span_ms"] for r in res["layers"]]
    print(f"median layer span {statistics.median(spans):.2f} ms")
    for key, what in (("host_gap", "host gap (layer done -> next layer entered)"),
                      ("host_in_layer", "host in a layer (routed -> done)")):
        ops = res.get(key) or {}
        if ops:
            print(f"{what} {ops['mean_window_ms']:.3f} ms; per layer there:")
            for t in ops["top"]:
                print(f"  {t['ms_per_layer']:7.3f} ms {t['calls_per_layer']:6.1f} x  {t['cat']:<12} {t['name'][:60]}")


def decode_summary(layers: list[dict]) -> dict:
    """The mean decode layer: where its copies and CPU experts fell after routing, and the PCIe lane's idle time."""
    keys = ("first_copy_ms", "copies_ms", "copies_end_ms", "cpu_start_ms", "cpu_ms", "host_done_ms", "span_ms",
            "n_hit", "n_fetch", "n_cpu")
    out = {k: statistics.mean(r[k] for r in layers if r[k] is not None) for k in keys
           if any(r[k] is not None for r in layers)}
    out["pcie_idle_ms"] = out["span_ms"] - out.get("copies_ms", 0.0)
    print("mean decode layer (ms after routing): " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    probe_args(ap, prompt_len=256)
    ap.add_argument("--decode-steps", type=int, default=0, help="also trace this many decode steps")
    a = ap.parse_args()
    engine, prompt = probe_engine(a)
    if not torch.cuda.is_available() or not hasattr(engine.backend, "phases"):
        sys.exit("prefill_trace needs CUDA and an offloading mode (fetch, cpu, hybrid)")
    engine.generate(prompt, SamplingParams(max_new_tokens=4))                    # warm-up
    before = torch.cuda.memory_stats()
    runs = [engine.generate(prompt, SamplingParams(max_new_tokens=1)).stats for _ in range(3)]
    after = torch.cuda.memory_stats()
    syncs = {k: after.get(k, 0) - before.get(k, 0) for k in ("num_alloc_retries", "num_sync_all_streams",
                                                               "num_device_free")}
    untraced = statistics.median(1000 * s.ttft_s for s in runs)
    gen = runs[-1].summary()
    events, rows, offset, phases = traced_prefill(engine, prompt, a.decode_steps)
    res = {**meta(), "mode": a.mode, "prefetch": a.prefetch, "batch_size": a.batch_size, "prompt_len": a.prompt_len,
           "ttft_ms_untraced": untraced, "ttft_ms_runs": [1000 * s.ttft_s for s in runs], "stats_untraced": gen, "allocator_3_runs": syncs,
           "phases": phases, **analyse(events, rows, offset), "host_gap": host_gap(events, rows, offset),
           "host_in_layer": host_in_layer(events, rows, offset),
           "timeline": timeline(events, rows, offset)}
    print(f"copied ahead {gen['copied_ahead']} (used {gen['copied_ahead_used']}) | hit rate {gen['hit_rate']:.3f} | "
          f"on CPU {gen['experts_on_cpu']} | fetched {gen['experts_fetched']}")
    print(f"allocator over the 3 untraced runs: {syncs}")
    print(f"TTFT untraced, median of 3 {untraced:.1f} ms ({a.batch_size * a.prompt_len / untraced * 1000:.0f} tok/s)")
    n_moe = len(engine.cfg.moe_layers)
    if a.decode_steps:
        res["decode"] = decode_summary(res["layers"][n_moe:])
        res["layers"] = res["layers"][:n_moe]
    table(res)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    from hybrid.engine.errors import friendly
    friendly(main)

"""Where does an offloaded decode step spend its time? Runs one generation with the executor's phase log on and
prints, per MoE layer phase, the mean host time, plus the time between layers (graph pieces) and the step total.

    python eval/probes/profile_layers.py --model DIR --mode hybrid --gpu-memory 12GiB [--prefetch gate] [--out x.json]"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eval.common import meta, probe_args, probe_engine  # noqa: E402
from hybrid.engine.sampling import SamplingParams  # noqa: E402


def between_layers_ms(rows: list[dict]) -> float:
    gaps = [1000 * (b["enter"] - a["done"]) for a, b in zip(rows, rows[1:])
            if "done" in a and b["layer"] > a["layer"]]
    return statistics.mean(gaps) if gaps else 0.0


def error_classes(rows: list[dict], meas: list[float], pred: list[float]) -> dict:
    """The planner's predicted against the measured layer time, per kind of layer (which lanes its plan used):
    median predicted and measured ms and the median relative error."""
    groups: dict[str, list[tuple[float, float]]] = {}
    for r, m, p in zip(rows, meas, pred):
        key = "+".join(k for k in ("hit", "fetch", "cpu") if r.get(f"n_{k}", 0)) or "none"
        groups.setdefault(key, []).append((p, m))
    return {k: {"layers": len(v), "pred_ms": statistics.median(p for p, _ in v),
                "meas_ms": statistics.median(m for _, m in v),
                "median_rel_err": statistics.median(abs(p - m) / m for p, m in v if m > 0)} for k, v in groups.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    probe_args(ap)
    ap.add_argument("--new-tokens", type=int, default=64)
    a = ap.parse_args()
    engine, prompt = probe_engine(a)
    params = SamplingParams(max_new_tokens=8)
    engine.generate(prompt, params)                                      # warm-up: graphs captured, caches filled
    log = engine.backend.phases
    log.enabled, log.rows = True, []
    out = engine.generate(prompt, SamplingParams(max_new_tokens=a.new_tokens))
    log.enabled = False
    rows = [r for r in log.rows if "done" in r]
    summary = log.summary()
    step_ms = 1000 * statistics.mean(out.stats.step_s)
    moe_ms = sum(1000 * (r["done"] - r["enter"]) for r in rows) / max(1, len(out.stats.step_s) + 1)
    report = {**meta(), "mode": a.mode, "prefetch": a.prefetch, "batch_size": a.batch_size,
              "cpu_kernel": engine.backend.cpu.experts.label if hasattr(engine.backend, "cpu") else None,
              "step_ms": step_ms, "moe_layers_ms_per_step": moe_ms,
              "between_layers_ms": between_layers_ms(rows), "process_threads": len(os.listdir("/proc/self/task")), "phases": summary, "stats": out.stats.summary(),
              "mean_counts": {k: statistics.mean(r.get(k, 0) for r in rows) if rows else 0.0
                              for k in ("n_hit", "n_fetch", "n_cpu", "n_ahead")}}
    print(f"threads in process {report['process_threads']} | step {step_ms:.2f} ms | MoE layers {moe_ms:.2f} ms/step | between layers "
          f"{report['between_layers_ms']:.3f} ms | counts {report['mean_counts']}")
    for k, v in summary.items():
        if isinstance(v, dict) and "mean_ms" in v:
            print(f"  {k:22s} mean {v['mean_ms']:.3f}  p50 {v['p50_ms']:.3f} ms  ({v['what']})")
    print(f"  CPU lane ms by experts per call: {summary['cpu_ms_by_experts']}")
    planned_with = {k: round(summary[k]["p50"], 3) for k in ("cpu_scale", "cpu_lag_ms", "room") if k in summary}
    print(f"  the planner's lane state (p50): {planned_with}")
    st = report["stats"]
    print(f"  layer time predicted {st.get('layer_pred_ms_mean', 0):.3f} vs measured {st.get('layer_meas_ms_mean', 0):.3f} ms"
          f" | hit {st.get('hit_rate', 0):.3f} | prefetched {st.get('prefetched', 0)} used {st.get('prefetch_used', 0)}")
    meas, pred = out.stats.layer_meas_ms, out.stats.layer_pred_ms
    planned = [r for r in rows if not r.get("guessed")]              # guessed layers have no layer time
    if len(meas) == len(planned):
        report["error_by_kind"] = error_classes(planned, meas, pred)
        for k, v in report["error_by_kind"].items():
            print(f"  {k:14s} {v['layers']:5d} layers: predicted {v['pred_ms']:.3f} vs measured {v['meas_ms']:.3f} ms "
                  f"(median error {100 * v['median_rel_err']:.0f}%)")
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    from hybrid.engine.errors import friendly
    friendly(main)

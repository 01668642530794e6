"""Quantized experts beside llama.cpp: one table from this engine's sweep results (eval/gpu_quant.sh) and
llama.cpp's measurements of Q4_K_M on the same synthetic weights, with a plot.

Each llama.cpp setting is matched to the smallest of our budgets its peak GPU memory fits in; at each budget the
llama.cpp row kept is the one with the fewest experts on the CPU (the fastest that fits). One row per (system,
weights, gpu_budget_gib, batch_size, prompt_tokens) -> results.json, results.csv, decode.png in --dir.

    python eval/quant_results.py [--dir eval/results/quant_h200]"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import ROOT, write_results

FIELDS = ["system", "weights", "setting", "gpu_budget_gib", "batch_size", "prompt_tokens", "decode_tok_s",
          "prefill_tok_s", "ttft_ms", "peak_gpu_gib", "hit_rate", "cpu_share", "gb_over_pcie", "same_run"]
RESIDENT = 12.0               # the budget "resident" rows are shown at (llama.cpp's whole Q4_K_M file fits)


def ours(raw: Path) -> list[dict]:
    rows = []
    for f in sorted(raw.glob("*/results.json")):
        for r in json.loads(f.read_text())["rows"]:
            if r.get("error"):
                continue
            budget = r["gpu_budget_gib"] if r["gpu_budget_gib"] is not None else RESIDENT
            rows.append({"system": "this", "weights": r["experts"], "setting": r["mode"], "gpu_budget_gib": budget,
                         "batch_size": r["batch_size"], "prompt_tokens": r["prompt_tokens"],
                         "decode_tok_s": r["decode_tok_s"], "prefill_tok_s": r["prefill_tok_s"],
                         "ttft_ms": r["ttft_ms"], "peak_gpu_gib": r["peak_gpu_gib"], "hit_rate": r.get("hit_rate"),
                         "cpu_share": r.get("cpu_share"), "gb_over_pcie": r.get("gb_over_pcie"), "same_run": True})
    return rows


def llamacpp(d: Path, budgets: list[float]) -> list[dict]:
    """llama.cpp's Q4_K_M rows (eval/llamacpp_bench.py's JSON: llamacpp.json, and llamacpp_*.json of more settings
    from the same lease; not the bf16 file's) at the budgets their peaks fit; decode may be one figure or one per
    prompt length."""
    files = [f for f in sorted(d.glob("llamacpp*.json")) if "bf16" not in f.name]
    peers = [json.loads(f.read_text()) for f in files]
    same_run = all(p["same_run"] for p in peers)
    best: dict[tuple, dict] = {}
    for s in (row for p in peers for row in p["rows"]):
        fits = [b for b in budgets if s["peak_gpu_gib"] is not None and s["peak_gpu_gib"] <= b]
        if not fits:
            continue
        key = (min(fits), s["batch_size"])
        if key not in best or s["ncmoe"] < best[key]["ncmoe"]:
            best[key] = s
    rows = []
    for (budget, batch), s in sorted(best.items()):
        for prompt, pre in s["prefill_tok_s"].items():
            dec = s["decode_tok_s"]
            rows.append({"system": "llama.cpp", "weights": "Q4_K_M", "setting": s["setting"], "gpu_budget_gib": budget,
                         "batch_size": batch, "prompt_tokens": int(prompt),
                         "decode_tok_s": dec.get(prompt) if isinstance(dec, dict) else dec,
                         "prefill_tok_s": pre, "ttft_ms": 1000 * int(prompt) * batch / pre,
                         "peak_gpu_gib": s["peak_gpu_gib"], "same_run": same_run})
    return rows


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, batch in zip(axes, (1, 16)):
        for (system, weights) in sorted({(r["system"], r["weights"]) for r in rows}):
            pts = sorted({(r["gpu_budget_gib"], r["decode_tok_s"]) for r in rows if r["system"] == system
                          and r["weights"] == weights and r["batch_size"] == batch and r["prompt_tokens"] == 128})
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{system} {weights}")
        ax.set(title=f"decode, batch {batch}, prompt 128", xlabel="GPU budget (GiB; 12 = all resident)",
               ylabel="tok/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "decode.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=str(ROOT / "eval" / "results" / "quant_h200"), help="results folder")
    d = Path(ap.parse_args().dir)
    mine = ours(d / "raw")
    rows = mine + llamacpp(d, sorted({r["gpu_budget_gib"] for r in mine}))
    rows.sort(key=lambda r: (r["gpu_budget_gib"], r["batch_size"], r["prompt_tokens"], r["system"], r["weights"]))
    write_results(d, rows, FIELDS)
    plot(rows, d)
    print(f"{'GiB':>5} {'bs':>3} {'len':>4}  {'system':<10}{'weights':<8}{'setting':<22}{'decode':>8}{'prefill':>9}"
          f"{'peak':>6}")
    for r in rows:
        print(f"{r['gpu_budget_gib']:5.0f} {r['batch_size']:3} {r['prompt_tokens']:4}  {r['system']:<10}"
              f"{r['weights']:<8}{str(r['setting'])[:21]:<22}{r['decode_tok_s'] or 0:8.1f}{r['prefill_tok_s']:9.0f}"
              f"{r['peak_gpu_gib']:6.2f}")


if __name__ == "__main__":
    main()

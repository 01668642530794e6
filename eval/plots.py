"""Plots of a sweep (latency and throughput against batch size, expert traffic, the cost model's accuracy) and of a
serving run (`serve_bench.py`: throughput and latency against concurrency, one line per system).

    python eval/plots.py serve DIR     # DIR holds one serve_bench folder per system; writes DIR/serve.png"""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("error")]


def _by_mode(rows: list[dict], length: int) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in rows:
        if r["prompt_tokens"] == length:
            out[r["mode"]].append(r)
    return {m: sorted(v, key=lambda r: r["batch_size"]) for m, v in out.items()}


def versus_batch(rows: list[dict], key: str, label: str, path: Path, log: bool = False) -> None:
    lens = sorted({r["prompt_tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(lens), figsize=(5 * len(lens), 4), squeeze=False)
    for ax, n in zip(axes[0], lens):
        for mode, rs in _by_mode(rows, n).items():
            ax.plot([r["batch_size"] for r in rs], [r[key] for r in rs], marker="o", label=mode)
        ax.set(title=f"prompt {n} tokens", xlabel="batch size", ylabel=label)
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def traffic(rows: list[dict], path: Path) -> None:
    modes = [m for m in dict.fromkeys(r["mode"] for r in rows) if not m.startswith(("gpu", "transformers"))]
    batches = sorted({r["batch_size"] for r in rows})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(modes))
    for i, m in enumerate(modes):
        rs = [r for r in rows if r["mode"] == m]
        hit = [sum(r["hit_rate"] for r in rs if r["batch_size"] == b) / max(1, sum(r["batch_size"] == b for r in rs))
               for b in batches]
        gb = [sum(r["gb_over_pcie"] / (r["new_tokens"] * r["batch_size"]) for r in rs if r["batch_size"] == b)
              / max(1, sum(r["batch_size"] == b for r in rs)) for b in batches]
        xs = [k + i * width for k in range(len(batches))]
        a1.bar(xs, [100 * h for h in hit], width, label=m)
        a2.bar(xs, gb, width, label=m)
    for ax, t in ((a1, "expert cache hit rate (%)"), (a2, "GB over PCIe per generated token")):
        ax.set_xticks([k + 0.4 - width / 2 for k in range(len(batches))], [f"bs {b}" for b in batches])
        ax.set_title(t)
        ax.grid(alpha=0.3, axis="y")
    a1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cost_model(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    top = 0.0
    for m in dict.fromkeys(r["mode"] for r in rows):
        rs = [r for r in rows if r["mode"] == m and r.get("layer_meas_ms_mean")]
        if rs:
            ax.scatter([r["layer_pred_ms_mean"] for r in rs], [r["layer_meas_ms_mean"] for r in rs], label=m, s=18)
            top = max(top, *(r["layer_meas_ms_mean"] for r in rs), *(r["layer_pred_ms_mean"] for r in rs))
    ax.plot([0, top], [0, top], "k--", lw=1, label="predicted = measured")
    ax.set(xlabel="predicted MoE layer time (ms)", ylabel="measured MoE layer time (ms)",
           title="cost model: mean layer time per cell")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def make_plots(rows: list[dict], out_dir: Path) -> list[Path]:
    rows = _ok(rows)
    out_dir = Path(out_dir)
    paths = [out_dir / n for n in ("latency.png", "throughput.png", "traffic.png", "cost_model.png")]
    if not rows:
        return []
    versus_batch(rows, "tpot_ms_mean", "time per output token (ms)", paths[0], log=True)
    versus_batch(rows, "decode_tok_s", "decode throughput (tok/s, whole batch)", paths[1], log=True)
    traffic(rows, paths[2])
    cost_model(rows, paths[3])
    return paths


def serving(systems: dict[str, list[dict]], path: Path) -> None:
    """Output tok/s, TTFT p50 and inter-token latency p50 against concurrency, a line per system."""
    panels = (("output_tok_s", "output throughput (tok/s)"), ("ttft_ms_p50", "TTFT p50 (ms)"),
              ("itl_ms_p50", "inter-token latency p50 (ms)"))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (key, label) in zip(axes, panels):
        for name, rows in systems.items():
            rows = sorted((r for r in rows if r.get(key) is not None), key=lambda r: r["concurrency"])
            ax.plot([r["concurrency"] for r in rows], [r[key] for r in rows], marker="o", label=name)
        ax.set(xlabel="concurrent requests", ylabel=label)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fail(message: str) -> None:
    import sys
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json
    ap = argparse.ArgumentParser(description="plots of a serving run")
    ap.add_argument("what", choices=["serve"])
    ap.add_argument("dir", help="folder with one serve_bench.py results folder per system")
    a = ap.parse_args(argv)
    if not Path(a.dir).is_dir():
        _fail(f"{a.dir} is not a folder (one serve_bench.py results folder per system)")
    systems = {d.name: json.loads((d / "results.json").read_text())["rows"]
               for d in sorted(Path(a.dir).iterdir()) if (d / "results.json").is_file()}
    if not systems:
        _fail(f"no <system>/results.json under {a.dir}")
    serving(systems, Path(a.dir) / "serve.png")
    print(Path(a.dir) / "serve.png")


if __name__ == "__main__":
    main()

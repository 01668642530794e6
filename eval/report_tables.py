"""Markdown tables from a sweep's results.json (the numbers quoted in REPORT.md come from here).

    python eval/report_tables.py eval/results/sweep_h200/results.json"""
from __future__ import annotations

import json
import sys
from pathlib import Path

MODES = ("gpu", "fetch", "cpu", "hybrid", "hybrid+gate")


def grid(rows: list[dict], key: str, fmt: str, modes=MODES) -> str:
    cells = {(r["mode"], r["batch_size"], r["prompt_tokens"]): r for r in rows if not r.get("error")}
    shapes = sorted({(r["batch_size"], r["prompt_tokens"]) for r in rows})
    out = ["| batch | prompt | " + " | ".join(modes) + " |", "|---|---|" + "---|" * len(modes)]
    for b, n in shapes:
        vals = [cells.get((m, b, n)) for m in modes]
        out.append(f"| {b} | {n} | " + " | ".join("—" if v is None or v.get(key) is None else format(v[key], fmt)
                                                  for v in vals) + " |")
    return "\n".join(out)


def per_token_traffic(rows: list[dict]) -> str:
    out = ["| mode | batch | hit rate | GB over PCIe per token | share of misses on CPU | CPU ms/expert |",
           "|---|---|---|---|---|---|"]
    for m in MODES[1:]:
        for b in (1, 4, 8, 16):
            rs = [r for r in rows if r["mode"] == m and r["batch_size"] == b and not r.get("error")]
            if rs:
                avg = lambda k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
                gb = sum(r["gb_over_pcie"] / (r["new_tokens"] * b) for r in rs) / len(rs)
                out.append(f"| {m} | {b} | {avg('hit_rate'):.2f} | {gb:.2f} | {avg('cpu_share'):.2f} | "
                           f"{avg('cpu_ms_per_expert'):.3f} |")
    return "\n".join(out)


def main() -> None:
    rows = json.loads(Path(sys.argv[1]).read_text())["rows"]
    for title, key, fmt in (("Decode throughput, tok/s summed over the batch", "decode_tok_s", ".1f"),
                            ("Time per output token, mean ms", "tpot_ms_mean", ".1f"),
                            ("Time per output token, p90 ms", "tpot_ms_p90", ".1f"),
                            ("Time to first token, ms", "ttft_ms", ".0f"),
                            ("Prefill throughput, prompt tok/s", "prefill_tok_s", ".0f"),
                            ("Peak GPU memory, GiB (torch reserved + outside its allocator)", "peak_gpu_gib", ".2f"),
                            ("Median relative error of predicted vs measured MoE layer time",
                             "layer_time_median_rel_err", ".2f")):
        print(f"\n**{title}**\n\n{grid(rows, key, fmt)}")
    print(f"\n**Expert traffic (mean over prompt lengths)**\n\n{per_token_traffic(rows)}")


if __name__ == "__main__":
    main()

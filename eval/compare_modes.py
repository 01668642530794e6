"""Latency and throughput of every mode (and the transformers peers) over batch sizes x prompt lengths.

    python eval/compare_modes.py --model /dev/shm/v2lite --gpu-memory 12GiB
Each (mode, batch size) runs in its own process (clean memory peaks and budgets) over all prompt lengths, on the
same prompts. Results: JSON + CSV under --out-dir (resumable: finished cells are skipped), then plots."""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from common import DEFAULT_PROMPTS, ROOT, meta
from hybrid.cli import parse_bytes

FIELDS = ("mode", "batch_size", "prompt_tokens", "new_tokens", "ttft_ms", "ttft_first_ms", "tpot_ms_mean", "tpot_ms_p50",
          "tpot_ms_p90", "decode_tok_s", "e2e_tok_s", "prefill_tok_s", "peak_gpu_gib", "hit_rate", "gb_over_pcie",
          "cpu_share", "cpu_ms_per_expert", "prefetch_recall", "layer_pred_ms_mean", "layer_meas_ms_mean",
          "layer_time_median_rel_err", "logits_rel_err_vs_gpu", "logits_rel_err_vs_fp32", "tokens_identical_prefix",
          "error")


def args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer")
    ap.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL: {messages: [...]} or {text: ...}")
    ap.add_argument("--gpu-memory", type=parse_bytes, default=parse_bytes("12GiB"))
    ap.add_argument("--modes", default="gpu,fetch,cpu,hybrid,hybrid+gate")
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--prompt-lens", default="128,256,512")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--cache-policy", default="lfu")
    ap.add_argument("--peers", default="", help="transformers,transformers+accelerate (prompt 128)")
    ap.add_argument("--peer-batch-sizes", default="1,16")
    ap.add_argument("--peer-new-tokens", type=int, default=32)
    ap.add_argument("--accelerate-new-tokens", type=int, default=4)
    ap.add_argument("--fp32-reference", action="store_true", help="also run gpu mode in float32 (~64 GB)")
    ap.add_argument("--out-dir", default=str(ROOT / "eval" / "results" / "sweep"))
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--rows", help=argparse.SUPPRESS)
    return ap.parse_args()


def jobs(a) -> list[tuple[str, int, list[int]]]:
    lens = [int(x) for x in a.prompt_lens.split(",")]
    out = [(m, int(b), lens) for m in a.modes.split(",") if m for b in a.batch_sizes.split(",")]
    out += [(p, int(b), [min(lens)]) for p in a.peers.split(",") if p for b in a.peer_batch_sizes.split(",")]
    return out


def load(out_dir: Path) -> list[dict]:
    f = out_dir / "results.json"
    return json.loads(f.read_text())["rows"] if f.exists() else []


def save(out_dir: Path, rows: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta(), "rows": rows}, indent=1))
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def table(rows: list[dict]) -> None:
    print(f"\n{'mode':<18}{'bs':>3}{'len':>5}{'TTFT ms':>9}{'ms/tok':>8}{'tok/s':>8}{'hit%':>6}{'cpu%':>6}"
          f"{'GB PCIe':>8}{'GiB':>6}{'err%':>6}")
    for r in rows:
        head = f"{r['mode']:<18}{r['batch_size']:>3}{r['prompt_tokens']:>5}"
        if r.get("error"):
            print(f"{head}  failed: {r['error'].strip().splitlines()[-1][:70]}")
            continue
        err = r.get("layer_time_median_rel_err")
        print(f"{head}{r['ttft_ms']:9.0f}{r['tpot_ms_mean']:8.2f}{r['decode_tok_s']:8.1f}"
              f"{100 * r.get('hit_rate', 1):6.1f}{100 * r.get('cpu_share', 0):6.1f}{r.get('gb_over_pcie', 0):8.2f}"
              f"{r['peak_gpu_gib']:6.2f}{'' if err is None else f'{100 * err:6.1f}'}")


def main() -> None:
    a = args()
    out_dir = Path(a.out_dir)
    if a.one:
        from cells import run_job
        return run_job(a)
    rows = load(out_dir)
    done = {(r["mode"], r["batch_size"], r["prompt_tokens"]) for r in rows if not r.get("error")}
    todo = [j for j in jobs(a) if any((j[0], j[1], n) not in done for n in j[2])]
    rows = [r for r in rows if (r["mode"], r["batch_size"], r["prompt_tokens"]) in done]
    for mode, batch, lens in ([] if a.plot_only else tqdm(todo, desc="sweep", unit="job")):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "rows.json"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--one", f"{mode}:{batch}", "--rows", str(path)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            got = json.loads(path.read_text()) if path.exists() else []
        have = {g["prompt_tokens"] for g in got}
        err = r.stderr.strip()[-1500:] if r.returncode else ""
        got += [{"mode": mode, "batch_size": batch, "prompt_tokens": n, "error": err or "no result"}
                for n in lens if n not in have]
        rows += got
        save(out_dir, rows)
    if not a.plot_only:
        save(out_dir, rows)
    from plots import make_plots
    make_plots(rows, out_dir)
    table(rows)


if __name__ == "__main__":
    main()

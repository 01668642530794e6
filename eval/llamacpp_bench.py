"""llama.cpp, the peer, measured the way this project compares against it: llama-bench (batch 1, prompts 128 and
512, 64 generated tokens) and llama-batched-bench (batch 16) at each `--n-cpu-moe` setting, weights pinned
(`-lm none`), all layers offloaded (`-ngl 99`), peak GPU memory sampled from nvidia-smi while each runs. Writes the
rows eval/quant_results.py reads (`llamacpp.json`), with run metadata.

    python eval/llamacpp_bench.py --bin LLAMA/build/bin --model model-Q4_K_M.gguf --ncmoe 0,9,15,21 \\
        [--batched-ncmoe 9,15,21] [--out eval/results/quant_h200/llamacpp.json]"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from common import PeakGpu, meta, write_atomic
from hybrid.engine.cli import ArgParser, at_least, check_paths
from hybrid.model.config import ConfigError

PROMPTS = (128, 512)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def run(cmd: list[str]) -> tuple[list[dict], float | None]:
    with PeakGpu() as peak:
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({r.returncode}): {r.stderr.strip()[-800:]}")
    return json_lines(r.stdout + "\n" + r.stderr), peak.peak


def common_args(a, ncmoe: int) -> list[str]:
    return ["-m", a.model, "-ngl", "99", "-ncmoe", str(ncmoe), "-lm", a.load_mode, "-t", str(a.threads)]


def bench(a, ncmoe: int) -> dict:
    """Batch 1: prefill of each prompt length and decode of 64 tokens."""
    p = ",".join(map(str, PROMPTS))
    rows, peak = run([str(Path(a.bin) / "llama-bench"), *common_args(a, ncmoe), "-p", p, "-n", "64",
                      "-r", str(a.reps), "-o", "jsonl"])
    pre = {str(r["n_prompt"]): r["avg_ts"] for r in rows if r["n_gen"] == 0}
    dec = [r["avg_ts"] for r in rows if r["n_prompt"] == 0]
    return {"setting": f"-ncmoe {ncmoe}, {a.load_mode}", "ncmoe": ncmoe, "peak_gpu_gib": peak, "batch_size": 1,
            "prefill_tok_s": pre, "decode_tok_s": dec[0] if dec else None}


def batched(a, ncmoe: int, batch: int) -> dict:
    """`batch` sequences: prefill of each prompt length (all sequences), then 32 tokens each."""
    p = ",".join(map(str, PROMPTS))
    ctx = batch * (max(PROMPTS) + 32) + 256
    rows, peak = run([str(Path(a.bin) / "llama-batched-bench"), *common_args(a, ncmoe), "-npp", p, "-ntg", "32",
                      "-npl", str(batch), "-c", str(ctx), "--output-format", "jsonl"])
    return {"setting": f"-ncmoe {ncmoe}, {a.load_mode}, llama-batched-bench", "ncmoe": ncmoe,
            "peak_gpu_gib": peak, "batch_size": batch,
            "prefill_tok_s": {str(r["pp"]): r["speed_pp"] for r in rows},
            "decode_tok_s": {str(r["pp"]): r["speed_tg"] for r in rows}}


def main(argv: list[str] | None = None) -> None:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True, help="llama.cpp's build/bin folder")
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--ncmoe", default="0", help="comma-separated --n-cpu-moe settings for batch 1")
    ap.add_argument("--batched-ncmoe", default="", help="comma-separated settings for llama-batched-bench")
    ap.add_argument("--batch", type=at_least(2), default=16, help="sequences for llama-batched-bench")
    ap.add_argument("--threads", type=at_least(1), default=os.cpu_count(), help="CPU threads")
    ap.add_argument("--reps", type=at_least(1), default=2, help="llama-bench repetitions")
    ap.add_argument("--load-mode", default="none", choices=["none", "mmap"], help="none: pinned, not mmapped")
    ap.add_argument("--out", default="llamacpp.json", help="JSON output")
    a = ap.parse_args(argv)
    check_paths(a, inputs=("bin", "model"), outputs=("out",))
    try:
        settings = [int(x) for x in a.ncmoe.split(",") if x]
        batched_settings = [int(x) for x in a.batched_ncmoe.split(",") if x]
    except ValueError:
        raise ConfigError("--ncmoe / --batched-ncmoe: comma-separated integers") from None
    rows = [bench(a, n) for n in settings] + [batched(a, n, a.batch) for n in batched_settings]
    write_atomic(Path(a.out), json.dumps({"meta": meta(), "source": f"llama.cpp, {Path(a.model).name}, this run",
                                          "same_run": True, "rows": rows}, indent=1))
    for r in rows:
        print(f"{r['setting']:<45} bs {r['batch_size']:>2}  peak {r['peak_gpu_gib']}  prefill {r['prefill_tok_s']}"
              f"  decode {r['decode_tok_s']}")


if __name__ == "__main__":
    from hybrid.engine.errors import friendly
    friendly(main)

"""Decode speed while other processes keep cores busy, as people run the engine beside a browser and an IDE.

    python eval/contention.py                                   # default small model, mode auto
    python eval/contention.py --model /dev/shm/v2lite --mode hybrid --gpu-memory 12GiB --prefetch gate

Rounds of: 0, 1, 2 busy processes (each spins one core in pure Python), started before the generation and
stopped after it; per round the mean time per output token. Prints per busy count the median over rounds and its
ratio to the idle median (issue targets: <= 2.5x with one busy core and <= 5x with two on a 2-core machine; <= 1.3x
with one on the GPU box), and writes JSON (device, versions, date, command, code) to --out."""
from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

from common import ROOT, meta, write_atomic
from hybrid.engine.cli import ArgParser, at_least, default_model, engine_args, run_config
from hybrid.kernels.cpu_load import usable_cpus
from hybrid.engine.engine import Engine
from hybrid.engine.sampling import SamplingParams


def spin(stop) -> None:
    while not stop.is_set():
        for _ in range(100_000):
            pass


def one_round(engine: Engine, prompts: list[list[int]], new: int, busy: int) -> dict:
    stop = mp.Event()
    procs = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(busy)]
    for p in procs:
        p.start()
    time.sleep(0.6)                                    # the load is there before the request, as in real use
    stats = engine.generate(prompts, SamplingParams(max_new_tokens=new, stop_on_eos=False)).stats
    threads = engine.threads
    stop.set()
    for p in procs:
        p.join()
    steps = sorted(stats.step_s)
    return {"busy": busy, "tpot_ms_mean": stats.tpot_ms, "tpot_ms_p50": 1000 * steps[len(steps) // 2],
            "ttft_ms": 1000 * stats.ttft_s, "threads_at_end": threads}


def summarise(rounds: list[dict]) -> list[dict]:
    out = []
    for busy in sorted({r["busy"] for r in rounds}):
        mine = [r for r in rounds if r["busy"] == busy]
        out.append({"busy": busy, "tpot_ms_mean_median": statistics.median(r["tpot_ms_mean"] for r in mine),
                    "tpot_ms_p50_median": statistics.median(r["tpot_ms_p50"] for r in mine),
                    "threads_at_end": [r["threads_at_end"] for r in mine]})
    idle = out[0]["tpot_ms_mean_median"]
    for row in out:
        row["ratio_vs_idle"] = row["tpot_ms_mean_median"] / idle
    return out


def main() -> None:
    ap = ArgParser(description=__doc__)
    engine_args(ap)
    ap.add_argument("--busy", default="0,1,2", help="busy processes per round, comma-separated (first: idle)")
    ap.add_argument("--rounds", type=at_least(1), default=5, help="rounds of every busy count")
    ap.add_argument("--new-tokens", type=at_least(2), default=48, help="tokens per generation")
    ap.add_argument("--prompt-len", type=at_least(1), default=32, help="prompt tokens")
    ap.add_argument("--out", help="JSON output (default: eval/results/contention/<device>.json)")
    a = ap.parse_args()
    a.model = a.model or str(default_model()[0])
    engine = Engine(a.model, run_config(a), progress=False)
    prompts = [[(7 * i + 3) % 1000 + 10 for i in range(a.prompt_len)]] * a.batch_size
    engine.generate(prompts, SamplingParams(max_new_tokens=8))                      # warm-up (graphs, buffers)
    counts = [int(b) for b in a.busy.split(",")]
    rounds = [one_round(engine, prompts, a.new_tokens, b) for _ in range(a.rounds) for b in counts]
    table = summarise(rounds)
    device = meta()["device"]
    out = Path(a.out or ROOT / "eval" / "results" / "contention" / f"{device.replace(' ', '_')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, json.dumps({"meta": {**meta(), "cores": len(usable_cpus()), "mode": engine.run.mode,
                                           "batch_size": a.batch_size}, "summary": table, "rounds": rounds},
                                 indent=1))
    print(f"{engine.run.mode}, batch {a.batch_size}, {len(usable_cpus())} cores, {a.rounds} rounds -> {out}")
    print(f"{'busy':>4} {'ms/token (mean)':>16} {'(p50)':>8} {'x idle':>7}  threads")
    for r in table:
        print(f"{r['busy']:>4} {r['tpot_ms_mean_median']:>16.2f} {r['tpot_ms_p50_median']:>8.2f} "
              f"{r['ratio_vs_idle']:>7.2f}  {r['threads_at_end']}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    from hybrid.engine.errors import friendly
    friendly(main)

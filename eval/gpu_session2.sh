#!/usr/bin/env bash
# Device call: V2-Lite in /dev/shm, calibration, every mode at batch 1, then the CPU lane with OpenMP active waiting.
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_CACHE=/dev/shm/hc HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m hybrid.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
timeout 180 python3 calibrate.py --out /dev/shm/hc/costs.json 2>&1 | grep -v "it/s" | tail -3
cp /dev/shm/hc/costs.json "$OUT/costs.json"
timeout 300 python3 eval/bench_modes.py --model /dev/shm/v2lite --peers "" --fp32-reference "$@" --out "$OUT/bench_bs1.json" 2>&1 | grep -v "^{" | tee "$OUT/bench.log"
OMP_WAIT_POLICY=ACTIVE timeout 200 python3 eval/bench_modes.py --model /dev/shm/v2lite --peers "" --modes cpu,hybrid "$@" --out "$OUT/bench_bs1_omp_active.json" 2>&1 | grep -v "^{" | tee -a "$OUT/bench.log"
python3 - <<'PY'
import json, os
for f in ("bench_bs1.json", "bench_bs1_omp_active.json"):
    for r in json.load(open(os.path.join(os.environ.get("OUT", "/tmp/out"), f)))["rows"]:
        print(f, r["mode"], {k: round(r[k], 3) for k in ("cpu_ms_per_expert", "layer_time_median_rel_err", "hit_rate") if r.get(k) is not None})
PY

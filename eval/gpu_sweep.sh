#!/usr/bin/env bash
# Device call: V2-Lite in /dev/shm, calibration, then part of the batch x length sweep (resumes from eval/results).
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_CACHE=/dev/shm/hc HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/sweep"
[ -f eval/results/sweep_h200/results.json ] && cp eval/results/sweep_h200/results.json "$OUT/sweep/"
python3 -m hybrid.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
timeout 200 python3 calibrate.py --out /dev/shm/hc/costs.json 2>&1 | grep -v "it/s" | tail -4
cp /dev/shm/hc/costs.json "$OUT/costs.json"
timeout 480 python3 eval/compare_modes.py --model /dev/shm/v2lite --out-dir "$OUT/sweep" "$@" 2>&1 | grep -v "it/s\]" | tail -40

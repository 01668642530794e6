#!/usr/bin/env bash
# Device call: V2-Lite in /dev/shm, calibration, then part of the batch x length sweep (resumes from eval/results).
#   SWEEP_TIMEOUT=300 bash eval/gpu_sweep.sh --modes gpu,cpu --new-tokens 64
source eval/device_setup.sh sweep
[ -f eval/results/sweep_h200/results.json ] && cp eval/results/sweep_h200/results.json "$OUT/sweep/"
timeout "${SWEEP_TIMEOUT:-480}" python3 eval/compare_modes.py --model /dev/shm/v2lite --out-dir "$OUT/sweep" "$@" 2>&1 \
  | grep -v "it/s\]" | tail -40

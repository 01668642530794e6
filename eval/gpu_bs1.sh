#!/usr/bin/env bash
# Device call for the batch-1 targets: V2-Lite in /dev/shm, calibration, then every mode and the accelerate peer
# at batch 1, prompt 128, 128 new tokens, 12 GiB, with the fp32 reference for the precision check.
source eval/device_setup.sh bs1
timeout 420 python3 eval/compare_modes.py --model /dev/shm/v2lite --out-dir "$OUT/bs1" --batch-sizes 1 \
  --prompt-lens 128 --new-tokens 128 --fp32-reference --peers transformers,transformers+accelerate \
  --peer-batch-sizes 1 --accelerate-new-tokens 8 "$@" 2>&1 | grep -v "it/s\]" | tail -12

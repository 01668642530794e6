#!/usr/bin/env bash
# Device call: GPU time of the decode graph pieces (attention piece between MoE layers, expert graphs), modes gpu
# and hybrid at batch 1 and 16, with the attention piece's kernels; V2-Lite in /dev/shm, 12 GiB.
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_CACHE=/dev/shm/hc HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/pieces"
python3 -m hybrid.model.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
timeout 200 python3 calibrate.py --out /dev/shm/hc/costs.json 2>&1 | grep -v "it/s" | tail -3
for spec in ${SPECS:-gpu:1 gpu:16 hybrid:1 hybrid:16}; do
  IFS=: read -r m b <<< "$spec"
  mem=$([ "$m" = gpu ] && echo "" || echo "--gpu-memory 12GiB")
  timeout 150 python3 eval/probes/piece_times.py --model /dev/shm/v2lite $mem --max-seq-len 272 --mode $m \
    --batch-size $b --kernels --out "$OUT/pieces/${m}_bs$b.json" 2>&1 | grep -vE "it/s|%\|" | tail -32
done

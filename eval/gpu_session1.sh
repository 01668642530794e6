#!/usr/bin/env bash
# One device call: full synthetic V2-Lite in /dev/shm, calibration, every mode and the transformers peers.
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_CACHE=/dev/shm/hc HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
python3 -m hybrid.synthetic --preset small --out /dev/shm/small --tokenizer .tok 2>/dev/null
timeout 120 python3 run.py --model /dev/shm/small --mode hybrid --prefetch gate --gpu-memory 3GiB --max-new-tokens 16 2>&1 | tail -3
s=$(date +%s); python3 -m hybrid.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null; echo "gen_s=$(( $(date +%s) - s ))"
du -sh /dev/shm/v2lite
timeout 180 python3 calibrate.py --out /dev/shm/hc/costs.json 2>&1 | tee "$OUT/calibrate.txt" | grep -v "it/s"
cp /dev/shm/hc/costs.json "$OUT/costs.json"
timeout 420 python3 eval/bench_modes.py --model /dev/shm/v2lite "$@" --out "$OUT/bench_modes.json" 2>&1 | grep -v -E "it/s|Loading" | tee "$OUT/bench.log"

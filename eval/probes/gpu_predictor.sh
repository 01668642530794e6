#!/usr/bin/env bash
# Device call for the expert predictor: traces from 12 prompts (train) and 4 held-out prompts, training, the
# recall table, then batch-1 decode with prefetch none / gate / mlp at 12 GiB.
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_CACHE=/dev/shm/hc HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/pf"
M=/dev/shm/v2lite
python3 -m hybrid.model.synthetic --preset v2-lite --out $M --tokenizer .tok 2>/dev/null
timeout 200 python3 calibrate.py --out /dev/shm/hc/costs.json 2>&1 | grep -v "it/s" | tail -2
head -12 eval/prompts.jsonl > /dev/shm/train.jsonl; tail -4 eval/prompts.jsonl > /dev/shm/test.jsonl
for s in train test; do
  timeout 240 python3 run.py --model $M --mode gpu --prompts /dev/shm/$s.jsonl --max-new-tokens 128 \
    --record-trace /dev/shm/$s.npz 2>&1 | grep -E "trace saved|error" ; done
timeout 200 python3 -m hybrid.offload.predictor train --model $M --trace /dev/shm/train.npz --k 1,2,3 2>&1 | grep -v "it/s"
timeout 100 python3 -m hybrid.offload.predictor eval --model $M --trace /dev/shm/test.npz --out "$OUT/predictor_eval.json" \
  --plot "$OUT/predictor_recall.png" 2>&1 | tail -30
timeout 300 python3 eval/compare_modes.py --model $M --out-dir "$OUT/pf" --batch-sizes 1 --prompt-lens 128 \
  --new-tokens 64 --modes hybrid,hybrid+gate,hybrid+mlp 2>&1 | grep -v "it/s\]" | tail -8
rm -f "$OUT"/pf/*.png

#!/usr/bin/env bash
# Device call, right after eval/gpu_llamacpp.sh on the same machine (its Q4_K_M file is in /dev/shm/gguf), so that
# these figures share llama.cpp's run. Carry `.tok`, and `.ab_base` (an older checkout of this engine, e.g.
# `git archive <commit> hybrid cost_model eval run.py calibrate.py | tar -x -C .ab_base`):
#   1. batch-1 decode at 8 GiB on the Q4_K_M file, this code and the older one, phase logs (profile_layers.py):
#      $OUT/ab/this.json, $OUT/ab/base.json; if this code fails there, the cells below run the older one;
#   2. hybrid on the Q4_K_M file: 8 GiB (batch 1 and 16, prompts 128 and 512), 6 and 4 GiB (batch 1, prompt 128):
#      $OUT/gguf_q4k/<budget>/results.json;
#   3. bf16 hybrid at 12 GiB, batch 1 and 16, prompt 128: $OUT/hybrid/results.json. ~9 minutes (one mode).
# MODES: the modes of 2 and 3 (default hybrid; session 16's lease ran that), e.g. MODES=hybrid,hybrid+gate (longer).
#   [MODES=...] bash eval/gpu_cells.sh
source eval/device_setup.sh gguf_q4k q4k
export PYTHONPATH=/dev/shm/llama-src/llama.cpp/gguf-py
M=/dev/shm/gguf/model-Q4_K_M.gguf
ROOT=$PWD
mkdir -p "$OUT/ab"
for v in this base; do
  dir=$ROOT; [ $v = base ] && dir=$ROOT/.ab_base
  echo "== $v"
  (cd "$dir" && timeout 100 python3 eval/probes/profile_layers.py --model $M --experts q4k --gpu-memory 8GiB \
    --max-seq-len 640 --mode hybrid --batch-size 1 --out "$OUT/ab/$v.json" 2>&1 | grep -vE "it/s|%\|" | tail -13)
done
[ -s "$OUT/ab/this.json" ] || { echo "this code failed: the cells run the older one"; cd "$ROOT/.ab_base"; }
MODES=${MODES:-hybrid}
CELL_TIMEOUT=200 bash eval/gpu_gguf.sh 8GiB --modes "$MODES" --batch-sizes 1,16 --prompt-lens 128,512 --new-tokens 64
CELL_TIMEOUT=100 bash eval/gpu_gguf.sh "6GiB 4GiB" --modes "$MODES" --batch-sizes 1 --prompt-lens 128 --new-tokens 64
source eval/device_setup.sh hybrid bf16
timeout 150 python3 eval/compare_modes.py --model /dev/shm/v2lite --experts bf16 --modes "$MODES" --gpu-memory 12GiB \
  --batch-sizes 1,16 --prompt-lens 128 --new-tokens 64 --out-dir "$OUT/hybrid" 2>&1 | grep -v "it/s\]" | tail -4
rm -rf "$OUT/hybrid/refs" "$OUT/hybrid"/*.png "$OUT/hybrid"/*.csv

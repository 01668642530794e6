#!/usr/bin/env bash
# Device call, after eval/gpu_llamacpp.sh (and gpu_serve.sh) on the same machine, so that these figures share
# llama.cpp's run: the resident step (compare_modes `gpu`, batch 1 and 16, bf16 and q4), this engine on llama.cpp's
# Q4_K_M file at 8 GiB (hybrid+gate, batch 1 and 16) and bf16 at 12 GiB (hybrid+gate, batch 1), prompt 128, into
# $OUT/step, $OUT/gguf_q4k and $OUT/hybrid (eval/results/same_run_h200/ is one run of it). ~4 minutes.
#   bash eval/gpu_cells.sh
source eval/device_setup.sh step none
for f in bf16 q4; do
  timeout 150 python3 eval/compare_modes.py --model /dev/shm/v2lite --experts $f --modes gpu --batch-sizes 1,16 \
    --prompt-lens 128 --out-dir "$OUT/step/gpu_$f" 2>&1 | grep -v "it/s\]" | tail -3
  rm -rf "$OUT/step/gpu_$f/refs" "$OUT/step/gpu_$f"/*.png "$OUT/step/gpu_$f"/*.csv
done
CELL_TIMEOUT=130 bash eval/gpu_gguf.sh 8GiB --modes hybrid+gate --batch-sizes 1,16 --prompt-lens 128 --new-tokens 64
source eval/device_setup.sh hybrid bf16
timeout 100 python3 eval/compare_modes.py --model /dev/shm/v2lite --experts bf16 --modes hybrid+gate --gpu-memory 12GiB \
  --batch-sizes 1 --prompt-lens 128 --new-tokens 64 --out-dir "$OUT/hybrid" 2>&1 | grep -v "it/s\]" | tail -3
rm -rf "$OUT/hybrid/refs" "$OUT/hybrid"/*.png "$OUT/hybrid"/*.csv

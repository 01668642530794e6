#!/usr/bin/env bash
# Device call (~7 minutes): this code against an older checkout on one machine, for the decode guesses and the slot
# table (REPORT section 3). Carry `.tok` and `.ab_base` (e.g. `git archive a7792ce hybrid cost_model eval run.py
# calibrate.py | tar -x -C .ab_base`). q4 experts quantized from the synthetic HF checkpoint (no llama.cpp needed),
# 8 GiB, one calibration made by this code (it times the planned path, as the older code did):
#   1. profile_layers.py, hybrid and hybrid+gate at batch 1, hybrid+gate at batch 16 (or $SPECS, prefetch:batch
#      pairs), both codes: $OUT/ab/<code>_<spec>.json
#   2. compare_modes `gpu,hybrid` (or $CELL_MODES) at batch 1: the guesses' tokens and logits beside mode gpu's on the GPU: $OUT/cells/
#   bash eval/probes/gpu_guess_ab.sh
source eval/device_setup.sh ab q4
ROOT=$PWD
mkdir -p "$OUT/ab"
for v in this base; do
  dir=$ROOT; [ $v = base ] && dir=$ROOT/.ab_base
  for spec in ${SPECS:-none:1 gate:1 gate:16}; do
    IFS=: read -r p b <<< "$spec"
    echo "== $v hybrid+$p batch $b"
    (cd "$dir" && timeout 100 python3 eval/probes/profile_layers.py --model /dev/shm/v2lite --experts q4 \
      --gpu-memory 8GiB --max-seq-len 640 --mode hybrid --prefetch $p --batch-size $b \
      --out "$OUT/ab/${v}_${p}_bs$b.json" 2>&1 | grep -E "threads in process|layer time" | tail -2)
  done
done
rm -f "$OUT/ab"/costs*.json
timeout 150 python3 eval/compare_modes.py --model /dev/shm/v2lite --experts q4 --modes ${CELL_MODES:-gpu,hybrid} --gpu-memory 8GiB \
  --batch-sizes 1 --prompt-lens 128 --new-tokens 32 --out-dir "$OUT/cells" 2>&1 | grep -v "it/s\]" | tail -4
rm -rf "$OUT/cells/refs" "$OUT/cells"/*.png "$OUT/cells"/*.csv

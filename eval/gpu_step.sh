#!/usr/bin/env bash
# Device call: the resident (`gpu` mode) decode step. The fused kernels against their torch twins in bfloat16
# (eval/probes/fused_probe.py), each format's step replayed from its CUDA graph with its kernels listed
# (eval/probes/piece_times.py --kernels), then decode tok/s from compare_modes at batch 1 and 16, into $OUT/step/.
#   bash eval/gpu_step.sh "bf16 q4" "1 16"
FORMATS=${1:-bf16 q4}; BATCHES=${2:-1 16}
source eval/device_setup.sh step none
timeout 200 python3 eval/probes/fused_probe.py --model /dev/shm/v2lite --out "$OUT/step/fused.json" 2>&1 | tail -17
for f in $FORMATS; do
  for b in $BATCHES; do
    timeout 150 python3 eval/probes/piece_times.py --model /dev/shm/v2lite --mode gpu --experts "$f" --batch-size "$b" \
      --max-seq-len 256 --prompt-len 128 --kernels --top 30 --reps 20 --out "$OUT/step/$f-bs$b.json" 2>&1 \
      | grep -v "it/s" | tail -32
  done
done
for f in $FORMATS; do
  timeout 240 python3 eval/compare_modes.py --model /dev/shm/v2lite --experts "$f" --modes gpu \
    --batch-sizes "${BATCHES// /,}" --prompt-lens 128 --out-dir "$OUT/step/gpu_$f" 2>&1 | grep -v "it/s\]" | tail -6
  rm -rf "$OUT/step/gpu_$f/refs" "$OUT/step/gpu_$f"/*.png "$OUT/step/gpu_$f"/*.csv
done

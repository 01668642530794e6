#!/usr/bin/env bash
# Device call: quantized experts on the synthetic V2-Lite. Optionally the expert-kernel probe (PROBE=1) and the
# quality figures (QUALITY=1), the format's calibration, then the sweep with --experts FMT at each budget ("resident":
# mode gpu, no budget), into $OUT/quant_<fmt>/<budget>/results.json.
#   bash eval/gpu_quant.sh q4 "4GiB 6GiB 8GiB resident" [compare_modes options]
FMT=$1; BUDGETS=$2; shift 2
source eval/device_setup.sh "quant_$FMT" "$FMT"
[ -n "${PROBE:-}" ] && timeout 240 python3 eval/probes/quant_kernel_probe.py --out "$OUT/quant_$FMT/probe.json" 2>&1 | tail -40
[ -n "${QUALITY:-}" ] && timeout 300 python3 eval/quant_quality.py --model /dev/shm/v2lite --out "$OUT/quality.json" 2>&1 | tail -3
for b in $BUDGETS; do
  if [ "$b" = resident ]; then args=(--modes gpu); else args=(--gpu-memory "$b"); fi
  timeout "${CELL_TIMEOUT:-240}" python3 eval/compare_modes.py --model /dev/shm/v2lite --experts $FMT \
    --out-dir "$OUT/quant_$FMT/$b" "$@" "${args[@]}" 2>&1 | grep -v "it/s\]" | tail -12
  rm -rf "$OUT/quant_$FMT/$b/refs" "$OUT/quant_$FMT/$b"/*.png "$OUT/quant_$FMT/$b"/*.csv   # the device returns 8 files
done

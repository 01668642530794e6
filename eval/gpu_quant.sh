#!/usr/bin/env bash
# Device call: quantized experts on the synthetic V2-Lite. Optionally the expert-kernel probe (PROBE=1) and the
# quality figures (QUALITY=1), the format's calibration, then the sweep with --experts FMT at each budget ("resident":
# mode gpu, no budget), into $OUT/quant_<fmt>/<budget>/results.json.
#   bash eval/gpu_quant.sh q4 "4GiB 6GiB 8GiB resident" [compare_modes options]
FMT=$1; BUDGETS=$2; shift 2
export PYTHONUNBUFFERED=1 HYBRID_CACHE=/dev/shm/hc HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/quant_$FMT"
python3 -m hybrid.kernels.cpu_kernel >/dev/null
[ -f /dev/shm/v2lite/config.json ] || python3 -m hybrid.model.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
[ -n "${PROBE:-}" ] && timeout 240 python3 eval/probes/quant_kernel_probe.py --out "$OUT/quant_$FMT/probe.json" 2>&1 | tail -40
[ -n "${QUALITY:-}" ] && timeout 300 python3 eval/quant_quality.py --model /dev/shm/v2lite --out "$OUT/quality.json" 2>&1 | tail -3
[ -f /dev/shm/hc/costs-$FMT.json ] || timeout 200 python3 calibrate.py --experts $FMT 2>&1 | grep -E "fetch_ms|gpu_ms@1\"|cpu_ms@1\"|saved"
cp /dev/shm/hc/costs-$FMT.json "$OUT/quant_$FMT/" 2>/dev/null
for b in $BUDGETS; do
  if [ "$b" = resident ]; then args=(--modes gpu); else args=(--gpu-memory "$b"); fi
  timeout "${CELL_TIMEOUT:-240}" python3 eval/compare_modes.py --model /dev/shm/v2lite --experts $FMT \
    --out-dir "$OUT/quant_$FMT/$b" "$@" "${args[@]}" 2>&1 | grep -v "it/s\]" | tail -12
  rm -rf "$OUT/quant_$FMT/$b/refs" "$OUT/quant_$FMT/$b"/*.png "$OUT/quant_$FMT/$b"/*.csv   # the device returns 8 files
done

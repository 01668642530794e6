#!/usr/bin/env bash
# Device call: the quantized-expert kernels (eval/probes/quant_kernel_probe.py), the q4 calibration, and the
# engine on the synthetic V2-Lite with --experts q4: resident (quantizing once, timed) and hybrid at 6 GiB.
#   bash eval/probes/gpu_quant_check.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_CACHE=/dev/shm/hc HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/qc"
python3 -m hybrid.kernels.cpu_kernel >/dev/null
[ -f /dev/shm/v2lite/config.json ] || python3 -m hybrid.model.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
timeout 240 python3 eval/probes/quant_kernel_probe.py --out "$OUT/qc/probe.json" 2>&1 | tail -32
timeout 200 python3 calibrate.py --experts q4 2>&1 | grep -v "it/s" | tail -14
cp /dev/shm/hc/costs-q4.json "$OUT/qc/" 2>/dev/null
P="Write a short story about a robot who learns to paint, in five sentences."
/usr/bin/time -f "wall %e s, max RSS %M KB" timeout 300 python3 run.py --model /dev/shm/v2lite --experts q4 --mode gpu \
  --prompt "$P" --max-new-tokens 128 --json "$OUT/qc/q4_gpu.json" 2>&1 | grep -v "it/s\]" | tail -6
for b in 6GiB 4GiB; do
  timeout 200 python3 run.py --model /dev/shm/v2lite --experts q4 --mode hybrid --prefetch gate --gpu-memory $b \
    --prompt "$P" --max-new-tokens 128 --json "$OUT/qc/q4_hybrid_$b.json" 2>&1 | grep -v "it/s\]" | tail -4
done

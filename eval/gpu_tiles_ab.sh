#!/usr/bin/env bash
# Device call: the CPU kernel's AMX tile path (HYBRID_CPU_TILES=auto) against torch's path for prefill-sized
# experts (off), each with its own calibration, on one machine: the kernel probe, then per prompt length a
# batch-1 prefill trace under each setting (A B per length, so drift hits both), then decode phase logs.
#   bash eval/gpu_tiles_ab.sh [prompt lengths, default "256 128 512"] [decode batches, default "1 16"]
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/tiles"
[ -f /dev/shm/v2lite/config.json ] || \
  python3 -m hybrid.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
python3 eval/kernel_probe.py --threads 15 --tokens 1,8,16,24,32,48,64,128,384 --experts 16 \
  --kernels torch,amx,amx_pool,native_pool --out "$OUT/tiles/kernel_probe.json" | cut -c1-330
for v in auto off; do
  export HYBRID_CACHE=/dev/shm/hc_$v HYBRID_CPU_TILES=$v
  [ -f $HYBRID_CACHE/costs.json ] || timeout 200 python3 calibrate.py 2>&1 | grep -v "it/s" | tail -1
  cp $HYBRID_CACHE/costs.json "$OUT/tiles/costs_$v.json"
done
for n in ${1:-256 128 512}; do
  for v in auto off; do
    echo "== tiles $v prompt $n"
    HYBRID_CACHE=/dev/shm/hc_$v HYBRID_CPU_TILES=$v timeout 150 python3 eval/prefill_trace.py --model /dev/shm/v2lite \
      --gpu-memory 12GiB --max-seq-len 584 --mode hybrid --prefetch none --prompt-len $n \
      --out "$OUT/tiles/prefill_${v}_p$n.json" 2>&1 | grep -E "TTFT|span|on CPU"
  done
done
for b in ${2:-1 16}; do
  for v in auto off; do
    echo "== tiles $v decode bs$b"
    HYBRID_CACHE=/dev/shm/hc_$v HYBRID_CPU_TILES=$v timeout 120 python3 eval/profile_layers.py --model /dev/shm/v2lite \
      --gpu-memory 12GiB --max-seq-len 272 --mode hybrid --prefetch none --batch-size $b \
      --out "$OUT/tiles/decode_${v}_bs$b.json" 2>&1 | grep -E "step|predicted"
  done
done

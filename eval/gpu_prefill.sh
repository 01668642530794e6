#!/usr/bin/env bash
# Device call: where does a batch-1 offloaded prefill spend its time? V2-Lite in /dev/shm, calibration, then
# eval/prefill_trace.py per spec mode:prefetch:prompt_len[:extra,flags] at 12 GiB.
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_CACHE=/dev/shm/hc HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/prefill"
python3 -m hybrid.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
timeout 200 python3 calibrate.py --out /dev/shm/hc/costs.json 2>&1 | grep -v "it/s" | tail -3
cp /dev/shm/hc/costs.json "$OUT/prefill/costs.json"
for spec in ${SPECS:-hybrid:none:256 hybrid:gate:256 hybrid:none:128 fetch:none:256 cpu:none:256} "$@"; do
  IFS=: read -r m p n x <<< "$spec"; x=${x//,/ }
  name="$m"_"$p"_p"$n${x:+$(echo "$x" | tr -d ' -')}"
  echo "== $spec"
  timeout 150 python3 eval/prefill_trace.py --model /dev/shm/v2lite --gpu-memory 12GiB --max-seq-len 584 \
    --mode $m --prefetch $p --prompt-len $n $x --out "$OUT/prefill/$name.json" 2>&1 | grep -vE "it/s|%\|" | tail -34
done

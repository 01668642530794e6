#!/usr/bin/env bash
# Device call: where does a batch-1 offloaded prefill spend its time? V2-Lite in /dev/shm, calibration, then
# eval/probes/prefill_trace.py per spec mode:prefetch:prompt_len[:extra,flags] at 12 GiB.
source eval/device_setup.sh prefill
for spec in ${SPECS:-hybrid:none:256 hybrid:gate:256 hybrid:none:128 fetch:none:256 cpu:none:256} "$@"; do
  IFS=: read -r m p n x <<< "$spec"; x=${x//,/ }
  name="$m"_"$p"_p"$n${x:+$(echo "$x" | tr -d ' -')}"
  echo "== $spec"
  timeout 150 python3 eval/probes/prefill_trace.py --model /dev/shm/v2lite --gpu-memory 12GiB --max-seq-len 584 \
    --mode $m --prefetch $p --prompt-len $n $x --out "$OUT/prefill/$name.json" 2>&1 | grep -vE "it/s|%\|" | tail -34
done

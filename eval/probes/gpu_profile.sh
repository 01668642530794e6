#!/usr/bin/env bash
# Device call: where does batch-1 offloaded decode spend its time? CPU-lane contention probes, then the executor's
# phase log for hybrid (with and without gate prefetch) and the two single-lane modes on V2-Lite at 12 GiB.
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_CACHE=/dev/shm/hc HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/profile"
lscpu | grep -E "^(CPU\(s\)|Thread|Core|Socket|Model name|L3|NUMA)" ; cat /sys/devices/system/cpu/cpu15/topology/thread_siblings_list
python3 eval/probes/lane_probe.py --threads ${PROBE_THREADS:-16,15,12} --out "$OUT/profile/probe.json" | python3 eval/probes/probe_table.py
python3 -m hybrid.model.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
timeout 200 python3 calibrate.py --out /dev/shm/hc/costs.json 2>&1 | grep -v "it/s" | tail -3
cp /dev/shm/hc/costs.json "$OUT/profile/costs.json"
# spec: mode:prefetch[:threads[:batch[:extra,flags]]], e.g. hybrid:gate::16:--no-lookahead
for spec in ${SPECS:-"hybrid:none" "hybrid:gate" "cpu:none" "fetch:none"} "$@"; do
  IFS=: read -r m p t b x <<< "$spec"; b=${b:-1}; x=${x//,/ }
  name="$m"_"$p${t:+_t$t}_bs$b${x:+$(echo "$x" | tr -d ' -')}"
  echo "== $spec"
  timeout 150 python3 eval/probes/profile_layers.py --model /dev/shm/v2lite --gpu-memory 12GiB --max-seq-len 272 \
    --mode $m --prefetch $p ${t:+--cpu-threads $t} --batch-size $b $x --out "$OUT/profile/$name.json" 2>&1 \
    | grep -vE "it/s|%\|" | tail -11
done

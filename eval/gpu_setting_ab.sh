#!/usr/bin/env bash
# Device call: decode phase logs under two settings of one environment variable on one machine with one
# calibration, interleaved (A B A B ...) so that drift hits both. Each spec is mode:prefetch:batch[:repeats].
#   bash eval/gpu_setting_ab.sh HYBRID_COPY_AHEAD on prefill hybrid:none:16:2 hybrid:none:8
source eval/device_setup.sh settingab
VAR=$1 A=$2 B=$3; shift 3
for spec in "$@"; do
  IFS=: read -r m p b r <<< "$spec"
  for i in $(seq 1 "${r:-1}"); do
    for v in "$A" "$B"; do
      echo "-- $VAR=$v $m $p bs$b #$i"
      env "$VAR=$v" timeout 120 python3 eval/profile_layers.py --model /dev/shm/v2lite --gpu-memory 12GiB \
        --max-seq-len 272 --mode "$m" --prefetch "$p" --batch-size "$b" \
        --out "$OUT/settingab/${v}_${m}_${p}_bs${b}_$i.json" 2>&1 | grep -E "step|predicted"
    done
  done
done

#!/usr/bin/env bash
# Device call: decode phase logs under two engine settings (run.py flags) on one machine with one calibration,
# interleaved (A B A B ...) so that drift hits both. Each spec is mode:prefetch:batch[:repeats]. EXPERTS (default
# bf16) and BUDGET (default 12GiB) set the expert format and the GPU budget.
#   [EXPERTS=q4 BUDGET=8GiB] bash eval/probes/gpu_setting_ab.sh "--copy-ahead on" "--copy-ahead off" hybrid:none:16:2
source eval/device_setup.sh settingab "${EXPERTS:-bf16}"
A=$1 B=$2; shift 2
for spec in "$@"; do
  IFS=: read -r m p b r <<< "$spec"
  for i in $(seq 1 "${r:-1}"); do
    for v in "$A" "$B"; do
      echo "-- $v $m $p bs$b #$i"
      tag=$(tr -c 'A-Za-z0-9\n' _ <<< "$v")
      timeout 120 python3 eval/probes/profile_layers.py --model /dev/shm/v2lite --gpu-memory "${BUDGET:-12GiB}" \
        --experts "${EXPERTS:-bf16}" --max-seq-len 272 --mode "$m" --prefetch "$p" --batch-size "$b" $v \
        --out "$OUT/settingab/${tag}_${m}_${p}_bs${b}_$i.json" 2>&1 | grep -E "step|predicted"
    done
  done
done

#!/usr/bin/env bash
# Device call: one machine, one checkout, two process environments of the libraries underneath (e.g. OpenMP's
# wait policy), so that the difference is the setting, not the machine. Per environment: its own calibration (the
# setting may change what the cost model measures), probe, then decode profiles. Engine settings are flags:
# eval/probes/gpu_setting_ab.sh.
#   bash eval/probes/gpu_env_ab.sh "OMP_WAIT_POLICY=ACTIVE" hybrid:none:1 hybrid:none:16
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_CACHE=/dev/shm/hc HYBRID_TOKENIZER=$PWD/.tok
SETTING=$1; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/envab"
python3 -m hybrid.model.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
for env in "" "$SETTING"; do
  tag=${env:-default}; tag=${tag//[^A-Za-z0-9]/_}
  echo "== $tag"
  export HYBRID_CACHE=/dev/shm/hc_$tag
  env $env timeout 200 python3 calibrate.py 2>&1 | grep -v "it/s" | tail -4
  cp $HYBRID_CACHE/costs.json "$OUT/envab/costs_$tag.json"
  env $env python3 eval/probes/lane_probe.py --threads 15 --out "$OUT/envab/probe_$tag.json" | python3 eval/probes/probe_table.py
  for spec in "$@"; do
    IFS=: read -r m p b <<< "$spec"
    echo "-- $tag $spec"
    env $env timeout 120 python3 eval/probes/profile_layers.py --model /dev/shm/v2lite --gpu-memory 12GiB --max-seq-len 272 \
      --mode $m --prefetch $p --batch-size $b --out "$OUT/envab/${tag}_${m}_${p}_bs$b.json" 2>&1 | grep -E "step|predicted|cpu_start"
  done
done

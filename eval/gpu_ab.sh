#!/usr/bin/env bash
# Device call: an older checkout (a folder with its tree, e.g. `git archive REV | tar -x -C .old`, carried) and
# this one on the same machine, so that the difference is the code, not the machine (fresh machines differ by up
# to 15% in CPU-lane speed). One calibration (this tree's) serves both; the two trees alternate per spec
# (mode:prefetch:batch), each profiling one decode with its phase log.
# EXPERTS (default bf16) and BUDGET (default 12GiB) pick the experts' format and the GPU budget; both trees read one
# quantized copy of the experts.
#   [EXPERTS=q4 BUDGET=8GiB] bash eval/gpu_ab.sh .old hybrid:none:1 hybrid:gate:1 hybrid:none:16 hybrid:gate:16
OLD=$1; shift
EXPERTS=${EXPERTS:-bf16}; BUDGET=${BUDGET:-12GiB}
source eval/device_setup.sh ab "$EXPERTS"
mkdir -p /dev/shm/hc_old /dev/shm/hc/quantized && cp /dev/shm/hc/costs*.json /dev/shm/hc_old/
ln -sfn /dev/shm/hc/quantized /dev/shm/hc_old/quantized
python3 -m hybrid.kernels.cpu_kernel >/dev/null
(cd "$OLD" && HYBRID_CACHE=/dev/shm/hc_old python3 -m hybrid.kernels.cpu_kernel >/dev/null)
for spec in "$@"; do
  IFS=: read -r m p b <<< "$spec"
  for tag in new old; do
    tree=$([ $tag = new ] && echo . || echo "$OLD"); cache=$([ $tag = new ] && echo /dev/shm/hc || echo /dev/shm/hc_old)
    echo "== $tag $spec"
    probe=eval/probes/profile_layers.py; [ -f "$tree/$probe" ] || probe=eval/profile_layers.py   # older trees
    (cd "$tree" && HYBRID_CACHE=$cache timeout 120 python3 $probe --model /dev/shm/v2lite \
      --experts "$EXPERTS" --gpu-memory "$BUDGET" --max-seq-len 272 --mode $m --prefetch $p --batch-size $b --new-tokens ${TOKENS:-48} \
      --out "$OUT/ab/${tag}_${m}_${p}_bs$b.json" 2>&1 | grep -E "\| step |predicted")
  done
done

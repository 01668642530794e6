#!/usr/bin/env bash
# Device call: the same machine runs an older checkout (a git worktree at $1) and this one, so that the
# difference is the code, not the machine (fresh machines differ by up to 15% in CPU-lane speed).
# Each tree calibrates itself, then profiles hybrid decode at the given specs (mode:prefetch:batch).
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_TOKENIZER=$PWD/.tok
OLD=$1; shift
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/ab"
python3 eval/lane_probe.py --threads 15 --out "$OUT/ab/probe.json" | python3 eval/probe_table.py
python3 -m hybrid.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
for tree in "$OLD" .; do
  tag=$([ "$tree" = . ] && echo new || echo old)
  ( cd "$tree" && export HYBRID_CACHE=/dev/shm/hc_$tag &&
    timeout 200 python3 calibrate.py --out /dev/shm/hc_$tag/costs.json 2>&1 | tail -1 &&
    for spec in "$@"; do
      IFS=: read -r m p b <<< "$spec"
      echo "== $tag $spec"
      timeout 120 python3 eval/profile_layers.py --model /dev/shm/v2lite --gpu-memory 12GiB --max-seq-len 272 \
        --mode $m --prefetch $p --batch-size $b --out "$OUT/ab/${tag}_${m}_${p}_bs$b.json" 2>&1 | grep -E "step|predicted"
    done )
done

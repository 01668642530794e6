#!/usr/bin/env bash
# Device call: the native CPU kernel's variants on one machine, each calibrated, then decode phase logs. Variants
# edit this machine's copy of the checkout: new (as committed), max4 (native only up to 4 tokens per expert),
# old (session 5's kernel, from git $OLD, up to 4 tokens).
#   OLD=92a6ff8 bash eval/gpu_kernel_ab.sh hybrid:none:16 hybrid:none:1
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/kernelab"
python3 -m hybrid.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
cp hybrid/cpu_kernel.cpp /tmp/new_kernel.cpp; cp hybrid/cpu_experts.py /tmp/new_experts.py
for v in ${VARIANTS:-new max4 old}; do
  cp /tmp/new_kernel.cpp hybrid/cpu_kernel.cpp; cp /tmp/new_experts.py hybrid/cpu_experts.py
  [ "$v" != new ] && sed -i 's/^NATIVE_MAX_TOKENS = 8 /NATIVE_MAX_TOKENS = 4 /' hybrid/cpu_experts.py
  [ "$v" = old ] && git show "${OLD:-92a6ff8}:hybrid/cpu_kernel.cpp" > hybrid/cpu_kernel.cpp
  echo "== $v: $(grep -c 'tile<' hybrid/cpu_kernel.cpp) tile refs, $(grep '^NATIVE_MAX_TOKENS' hybrid/cpu_experts.py | cut -c1-24)"
  export HYBRID_CACHE=/dev/shm/hc_$v
  timeout 200 python3 calibrate.py 2>&1 | grep -v "it/s" | tail -1
  cp $HYBRID_CACHE/costs.json "$OUT/kernelab/costs_$v.json"
  for spec in "$@"; do
    IFS=: read -r m p b <<< "$spec"
    echo "-- $v $spec"
    timeout 120 python3 eval/profile_layers.py --model /dev/shm/v2lite --gpu-memory 12GiB --max-seq-len 272 \
      --mode $m --prefetch $p --batch-size $b --out "$OUT/kernelab/${v}_${m}_${p}_bs$b.json" 2>&1 | grep -E "step|predicted|CPU lane"
  done
done
cp /tmp/new_kernel.cpp hybrid/cpu_kernel.cpp; cp /tmp/new_experts.py hybrid/cpu_experts.py

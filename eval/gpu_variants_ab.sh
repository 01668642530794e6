#!/usr/bin/env bash
# Device call: engine settings side by side on one machine, interleaved per measurement so drift hits all.
# VARIANTS: space-separated name=VAR:value,VAR:value (environment for that variant); a variant calibrates into
# its own cache when its settings change what calibration measures (HYBRID_CPU_TILES, HYBRID_CPU_POOL,
# HYBRID_CPU_PREFETCH).
# Measures batch-1 prefill traces at PROMPTS and decode phase logs at BATCHES (for DECODE_VARIANTS, default all);
# CE_PROBE=1: eval/ce_probe.py first.
#   VARIANTS="amx=HYBRID_CPU_TILES:auto torch=HYBRID_CPU_TILES:off" PROMPTS="128 256" BATCHES="1 16" \
#     bash eval/gpu_variants_ab.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; D="$OUT/variants"; mkdir -p "$D"
[ -f /dev/shm/v2lite/config.json ] || \
  python3 -m hybrid.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
[ "${CE_PROBE:-0}" = 1 ] && python3 eval/ce_probe.py --out "$D/ce_probe.json"
with() {   # with NAME CMD...: run CMD in variant NAME's environment
  local spec; spec=$(tr ' ' '\n' <<< "$VARIANTS" | grep "^$1=" | cut -d= -f2-)
  local envs=(); IFS=, read -ra kv <<< "$spec"
  for x in "${kv[@]}"; do envs+=("${x%%:*}=${x#*:}"); done
  local key; key=$(printf '%s\n' "${envs[@]}" | grep -E "CPU_TILES|CPU_POOL|CPU_PREFETCH" | sort | tr -d '\n=' )
  shift; env "${envs[@]}" HYBRID_CACHE="/dev/shm/hc_${key:-default}" "$@"
}
names=$(tr ' ' '\n' <<< "$VARIANTS" | cut -d= -f1)
for v in $names; do
  with "$v" bash -c '[ -f $HYBRID_CACHE/costs.json ] || timeout 200 python3 calibrate.py 2>&1 | grep -v "it/s" | tail -1;
    cp $HYBRID_CACHE/costs.json '"$D/costs_$v.json"
done
for n in ${PROMPTS:-128 256}; do
  for v in $names; do
    echo "== $v prompt $n"
    with "$v" timeout 150 python3 eval/prefill_trace.py --model /dev/shm/v2lite --gpu-memory 12GiB --max-seq-len 584 \
      --mode hybrid --prefetch none --prompt-len $n --out "$D/prefill_${v}_p$n.json" 2>&1 | grep -E "TTFT|span|on CPU|host gap|^  +[0-9.]+ ms"
  done
done
for b in ${BATCHES:-}; do
  for v in ${DECODE_VARIANTS:-$names}; do
    echo "== $v decode bs$b"
    with "$v" timeout 120 python3 eval/profile_layers.py --model /dev/shm/v2lite --gpu-memory 12GiB \
      --max-seq-len 272 --mode hybrid --prefetch none --batch-size $b --out "$D/decode_${v}_bs$b.json" 2>&1 \
      | grep -E "step|predicted"
  done
done

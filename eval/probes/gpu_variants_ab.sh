#!/usr/bin/env bash
# Device call: engine settings side by side on one machine, interleaved per measurement so drift hits all.
# VARIANTS: space-separated name=--flag=value,--flag=value (run.py flags of that variant); a variant calibrates into
# its own cache, with the flags calibrate.py shares (--cpu-kernel, --cpu-pool, --cpu-tiles, --cpu-prefetch).
# Measures batch-1 prefill traces at PROMPTS and decode phase logs at BATCHES (for DECODE_VARIANTS, default all);
# CE_PROBE=1: eval/probes/ce_probe.py first.
#   VARIANTS="amx=--cpu-tiles=auto torch=--cpu-tiles=off" PROMPTS="128 256" BATCHES="1 16" \
#     bash eval/probes/gpu_variants_ab.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; D="$OUT/variants"; mkdir -p "$D"
[ -f /dev/shm/v2lite/config.json ] || \
  python3 -m hybrid.model.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
[ "${CE_PROBE:-0}" = 1 ] && python3 eval/probes/ce_probe.py --out "$D/ce_probe.json"
flags() {  # flags NAME [calibrate]: variant NAME's flags (only those calibrate.py takes, with "calibrate")
  local spec; spec=$(tr ' ' '\n' <<< "$VARIANTS" | grep "^$1=" | cut -d= -f2- | tr , ' ')
  [ "${2:-}" = calibrate ] && spec=$(tr ' ' '\n' <<< "$spec" | grep -E "^--cpu-(kernel|pool|tiles|prefetch)=")
  echo $spec
}
with() {   # with NAME CMD...: run CMD with variant NAME's flags, in its calibration's cache
  local name=$1 key; key=$(flags "$1" calibrate | tr -c 'A-Za-z0-9' _); shift
  HYBRID_CACHE="/dev/shm/hc_${key:-default}" "$@" $(flags "$name")
}
names=$(tr ' ' '\n' <<< "$VARIANTS" | cut -d= -f1)
for v in $names; do
  key=$(flags "$v" calibrate | tr -c 'A-Za-z0-9' _); cache="/dev/shm/hc_${key:-default}"
  [ -f "$cache/costs.json" ] || HYBRID_CACHE=$cache timeout 200 python3 calibrate.py $(flags "$v" calibrate) 2>&1 \
    | grep -v "it/s" | tail -1
  cp "$cache/costs.json" "$D/costs_$v.json"
done
for n in ${PROMPTS:-128 256}; do
  for v in $names; do
    echo "== $v prompt $n"
    with "$v" timeout 150 python3 eval/probes/prefill_trace.py --model /dev/shm/v2lite --gpu-memory 12GiB --max-seq-len 584 \
      --mode hybrid --prefetch none --prompt-len $n --out "$D/prefill_${v}_p$n.json" 2>&1 | grep -E "TTFT|span|on CPU|host gap|^  +[0-9.]+ ms"
  done
done
for b in ${BATCHES:-}; do
  for v in ${DECODE_VARIANTS:-$names}; do
    echo "== $v decode bs$b"
    with "$v" timeout 120 python3 eval/probes/profile_layers.py --model /dev/shm/v2lite --gpu-memory 12GiB \
      --max-seq-len 272 --mode hybrid --prefetch none --batch-size $b --out "$D/decode_${v}_bs$b.json" 2>&1 \
      | grep -E "step|predicted"
  done
done

# Sourced by the device-call scripts: environment, the full-size synthetic V2-Lite in /dev/shm (RAM: the box's disk
# is slow), and this machine's calibration for an expert format ($2: bf16 by default, "none" for no calibration),
# copied to "$OUT/$1/". Both are skipped when a script earlier in the same call made them already.
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_CACHE=/dev/shm/hc HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/$1"
pack_out() {       # the device returns at most 8 files a call: past that, the whole of $OUT goes into one archive
  [ "$(find "$OUT" -type f | wc -l)" -le 8 ] && return
  local t; t=$(mktemp -d)/out-$(date +%s%N).tgz
  tar czf "$t" -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv "$t" "$OUT/" && echo "packed $OUT into ${t##*/}"
}
trap pack_out EXIT
python3 -m hybrid.kernels.cpu_kernel >/dev/null
python3 eval/probes/host_speed.py --line     # the host's clock, load and speed at small steps (machines differ 2x)
[ -f /dev/shm/v2lite/config.json ] || \
  python3 -m hybrid.model.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
SETUP_FMT=${2:-bf16}
if [ "$SETUP_FMT" != none ]; then
  COSTS=/dev/shm/hc/costs$([ "$SETUP_FMT" = bf16 ] || echo "-$SETUP_FMT").json
  [ -f "$COSTS" ] || timeout 200 python3 calibrate.py --experts "$SETUP_FMT" 2>&1 | grep -v "it/s" | tail -3
  cp "$COSTS" "$OUT/$1/"
fi

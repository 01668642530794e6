# Sourced by the device-call scripts: environment, the full-size synthetic V2-Lite in /dev/shm (RAM: the box's disk
# is slow), and this machine's calibration, copied to "$OUT/$1/costs.json". Both are skipped when a script earlier
# in the same call made them already.
set -uo pipefail
export PYTHONUNBUFFERED=1 HYBRID_CACHE=/dev/shm/hc HYBRID_TOKENIZER=$PWD/.tok
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/$1"
[ -f /dev/shm/v2lite/config.json ] || \
  python3 -m hybrid.model.synthetic --preset v2-lite --out /dev/shm/v2lite --tokenizer .tok 2>/dev/null
[ -f /dev/shm/hc/costs.json ] || timeout 200 python3 calibrate.py --out /dev/shm/hc/costs.json 2>&1 | grep -v "it/s" | tail -3
cp /dev/shm/hc/costs.json "$OUT/$1/costs.json"

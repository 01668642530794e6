#!/usr/bin/env bash
# Device call: serve.py loaded by eval/serve_bench.py on loopback at each concurrency, and, given llama-server options,
# llama-server (built by eval/gpu_llamacpp.sh earlier on the same machine) on llama.cpp's Q4_K_M file with the same
# levels, into $OUT/serve/<system>/. Carry `.tok` and `.whl`: wheels of fastapi, uvicorn, prometheus_client and httpx
# for the box's Python, which has no package registry (`pip download --only-binary=:all: --python-version 3.12 ...`).
#   bash eval/gpu_serve.sh "--model /dev/shm/v2lite --mode gpu" "1,4,8,16"
# First eval/probes/warmup_memory.py with the same arguments ($OUT/serve/warmup_memory.json; WARMUP_PROBE=0 skips
# it): its warm-up also stores what the setting grows outside torch's allocator (hybrid/engine/outside_memory.py),
# so the server started after it plans with that and keeps within --gpu-memory (a first start plans with an
# estimate: hybrid/engine/outside_memory.first_start).
#   CALIBRATE=q4k bash eval/gpu_serve.sh "--model /dev/shm/gguf/model-Q4_K_M.gguf --gpu-memory 8GiB --prefetch gate" \
#       "1,4,8,16" "-ncmoe 9"
# After our server, eval/probes/batcher_probe.py runs the same setting's engine and batcher without HTTP at the same
# levels ($OUT/serve/batcher_probe.json; BATCHER_PROBE=0 skips it).
SERVE_ARGS=$1; LEVELS=${2:-1,4,8,16}; PEER_ARGS=${3:-}
source eval/device_setup.sh serve "${CALIBRATE:-none}"
[ -d /dev/shm/llama-src/llama.cpp/gguf-py ] && export PYTHONPATH=/dev/shm/llama-src/llama.cpp/gguf-py${PYTHONPATH:+:$PYTHONPATH}
if ! python3 -c "import fastapi, uvicorn, prometheus_client, httpx" 2>/dev/null; then
  # into a folder of its own: the box's Python may refuse installs into its environment (PEP 668)
  pip install -q --no-index --find-links .whl --target /dev/shm/pylib fastapi uvicorn prometheus_client httpx || exit 2
  export PYTHONPATH=/dev/shm/pylib${PYTHONPATH:+:$PYTHONPATH}
fi

serve_and_bench() {       # NAME PORT COMMAND...: start the server, wait until it answers, load it, stop it
  local name=$1 port=$2; shift 2
  mkdir -p "$OUT/serve/$name"
  "$@" > "$OUT/serve/$name/server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 300); do            # until it answers, or give up at once if the server died
    kill -0 $pid 2>/dev/null || { echo "error: $name exited:"; tail -5 "$OUT/serve/$name/server.log"; return 2; }
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" \
      2>/dev/null && break
    sleep 1
  done
  timeout "${BENCH_TIMEOUT:-240}" python3 eval/serve_bench.py --url "http://127.0.0.1:$port" --system "$name" \
    --concurrency "$LEVELS" --requests "${REQUESTS:-32}" --max-tokens "${MAX_TOKENS:-128}" \
    --out-dir "$OUT/serve/$name" 2>&1 | tail -6
  kill $pid; wait $pid 2>/dev/null
  # the device returns at most 8 files a call: the JSON holds what the CSV does
  tail -c 2000 "$OUT/serve/$name/server.log" > "$OUT/serve/$name/server.tail"
  rm -f "$OUT/serve/$name/server.log" "$OUT/serve/$name/results.csv"
}

if [ "${WARMUP_PROBE:-1}" != 0 ]; then   # where the warm-up's GPU memory goes, by allocating frame
  mkdir -p "$OUT/serve"
  # shellcheck disable=SC2086
  timeout 240 python3 eval/probes/warmup_memory.py --out "$OUT/serve/warmup_memory.json" -- $SERVE_ARGS \
    --max-batch-size 16 --max-seq-len 1024 2>&1 | grep -vE "it/s|%\|" | tail -30
fi
# shellcheck disable=SC2086
serve_and_bench this 8011 python3 serve.py $SERVE_ARGS --max-batch-size 16 --max-seq-len 1024 --port 8011
if [ "${BATCHER_PROBE:-1}" != 0 ]; then  # the same engine and batcher, no HTTP: what the HTTP side costs the steps
  # shellcheck disable=SC2086
  timeout 200 python3 eval/probes/batcher_probe.py --out "$OUT/serve/batcher_probe.json" --concurrency "$LEVELS" \
    --requests "${REQUESTS:-32}" --max-tokens "${MAX_TOKENS:-128}" -- $SERVE_ARGS --max-batch-size 16 \
    --max-seq-len 1024 2>&1 | grep -E "^batcher|rror" | tail -6
fi
if [ -n "$PEER_ARGS" ]; then
  # shellcheck disable=SC2086
  serve_and_bench llama-server 8012 /dev/shm/llama.cpp/build/bin/llama-server -m /dev/shm/gguf/model-Q4_K_M.gguf \
    -ngl 99 -np 16 -c $((16 * 1024)) -lm none --port 8012 $PEER_ARGS
fi

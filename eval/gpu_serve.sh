#!/usr/bin/env bash
# Device call: serve.py on the synthetic V2-Lite, loaded by eval/serve_bench.py on loopback at each concurrency,
# into $OUT/serve/. Carry `.tok` and `.whl`: wheels of fastapi, uvicorn, prometheus_client and httpx for the box's
# Python (it has no package registry; `pip download --only-binary=:all: --python-version 3.12 ...` makes them).
#   bash eval/gpu_serve.sh "--mode gpu" "1,4,8,16"
SERVE_ARGS=$1; LEVELS=${2:-1,4,8,16}
source eval/device_setup.sh serve none
if ! python3 -c "import fastapi, uvicorn, prometheus_client, httpx" 2>/dev/null; then
  # into a folder of its own: the box's Python may refuse installs into its environment (PEP 668)
  pip install -q --no-index --find-links .whl --target /dev/shm/pylib fastapi uvicorn prometheus_client httpx || exit 2
  export PYTHONPATH=/dev/shm/pylib${PYTHONPATH:+:$PYTHONPATH}
fi
# shellcheck disable=SC2086
python3 serve.py --model /dev/shm/v2lite $SERVE_ARGS --port 8011 --served-model-name v2lite > "$OUT/serve/server.log" 2>&1 &
PID=$!
for _ in $(seq 300); do            # until it answers, or gives up at once if the server died
  kill -0 $PID 2>/dev/null || { echo "error: the server exited:"; tail -5 "$OUT/serve/server.log"; exit 2; }
  python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8011/health', timeout=2)" \
    2>/dev/null && break
  sleep 1
done
timeout "${BENCH_TIMEOUT:-240}" python3 eval/serve_bench.py --url http://127.0.0.1:8011 --concurrency "$LEVELS" \
  --requests "${REQUESTS:-16}" --max-tokens "${MAX_TOKENS:-64}" --out-dir "$OUT/serve" 2>&1 | tail -8
python3 -c "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8011/metrics').read().decode())" \
  | grep -E "^hybrid_(requests|generation_tokens|expert_hit_rate|cpu_share|pcie)" 
kill $PID; tail -3 "$OUT/serve/server.log"

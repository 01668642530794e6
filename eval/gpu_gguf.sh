#!/usr/bin/env bash
# Device call: this engine on llama.cpp's own Q4_K_M file of the synthetic V2-Lite (made by eval/gpu_llamacpp.sh
# earlier on the same machine, in /dev/shm/gguf), experts moved into q4k planes as the file holds them, at each
# budget ("resident": mode gpu, no budget), into $OUT/gguf_q4k/<budget>/results.json. The box has no `gguf`
# package: the one in llama.cpp's source is put on PYTHONPATH.
#   bash eval/gpu_gguf.sh "4GiB 6GiB 8GiB resident" [compare_modes options]
BUDGETS=$1; shift
source eval/device_setup.sh gguf_q4k q4k
export PYTHONPATH=/dev/shm/llama-src/llama.cpp/gguf-py${PYTHONPATH:+:$PYTHONPATH}
M=/dev/shm/gguf/model-Q4_K_M.gguf
[ -f $M ] || { echo "error: $M is missing: run eval/gpu_llamacpp.sh first on this machine"; exit 2; }
[ -f "$OUT/gguf_q4k/types.json" ] || python3 eval/probes/gguf_types.py $M --out "$OUT/gguf_q4k/types.json" | tail -4
for b in $BUDGETS; do
  if [ "$b" = resident ]; then args=(--modes gpu); else args=(--gpu-memory "$b"); fi
  timeout "${CELL_TIMEOUT:-240}" python3 eval/compare_modes.py --model $M --experts q4k \
    --out-dir "$OUT/gguf_q4k/$b" "$@" "${args[@]}" 2>&1 | grep -v "it/s\]" | tail -12
  rm -rf "$OUT/gguf_q4k/$b/refs" "$OUT/gguf_q4k/$b"/*.png "$OUT/gguf_q4k/$b"/*.csv   # the device returns 8 files
done

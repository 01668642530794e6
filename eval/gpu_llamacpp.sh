#!/usr/bin/env bash
# Device call: llama.cpp, the peer, on the same synthetic V2-Lite as this engine. Carry `.peer` (a copy of
# ../shared/peers/llamacpp) and `.tok`. Builds llama.cpp (.peer/build.sh) while the checkpoint is written and converted
# to GGUF, quantizes it to Q4_K_M, then, with nothing compiling, llama-bench and llama-batched-bench at each
# --n-cpu-moe (eval/llamacpp_bench.py) into $OUT/llamacpp/llamacpp.json. ~9 minutes on the H200 box; everything stays in
# /dev/shm for the next call on the same machine (this engine's runs: eval/gpu_quant.sh).
# A third argument benches the bf16 GGUF too (llama.cpp's bf16 settings) into $OUT/llamacpp/llamacpp_bf16.json, a
# fourth the bf16 settings to bench memory-mapped as well (llamacpp_bf16_mmap.json), a fifth bf16's
# llama-batched-bench settings (issue 21's batch 16 at 12 GiB).
#   bash eval/gpu_llamacpp.sh "0,9,15,21" "9,15" ["0,19" ["19" ["19"]]]
source eval/device_setup.sh llamacpp none
L=/dev/shm/llama.cpp; SRC=/dev/shm/llama-src; G=/dev/shm/gguf; mkdir -p $G $SRC
if [ ! -x $L/build/bin/llama-bench ]; then
  # the vendored tree lacks tools/ui, which llama-server's build needs: put the asset-less stand-in there first
  # (build.sh extracts the same tree over it and keeps it)
  tar xzf .peer/lcpp.tgz -C "$(dirname $L)" && mkdir -p $L/tools/ui && cp eval/peer/llamacpp_ui/* $L/tools/ui/
  bash .peer/build.sh $L > $G/build.log 2>&1 &
  BUILD=$!
fi
[ -f $SRC/llama.cpp/convert_hf_to_gguf.py ] || tar xzf .peer/lcpp.tgz -C $SRC      # the converter's own copy
[ -f $G/model-bf16.gguf ] || { time python3 .peer/convert.py $SRC/llama.cpp /dev/shm/v2lite --outtype bf16 \
  --outfile $G/model-bf16.gguf > $G/convert.log 2>&1; } 2>&1 | grep real
[ -n "${BUILD:-}" ] && { wait $BUILD; tail -1 $G/build.log; }
[ -f $G/model-Q4_K_M.gguf ] || { time $L/build/bin/llama-quantize $G/model-bf16.gguf $G/model-Q4_K_M.gguf Q4_K_M \
  "$(nproc)" > $G/quantize.log 2>&1; } 2>&1 | grep real
ls -la $G | grep gguf
timeout "${BENCH_TIMEOUT:-300}" python3 eval/llamacpp_bench.py --bin $L/build/bin --model $G/model-Q4_K_M.gguf \
  --ncmoe "$1" --batched-ncmoe "${2:-}" --out "$OUT/llamacpp/llamacpp.json" 2>&1 | tail -12
[ -n "${3:-}" ] && timeout 240 python3 eval/llamacpp_bench.py --bin $L/build/bin --model $G/model-bf16.gguf \
  --ncmoe "$3" --batched-ncmoe "${5:-}" --out "$OUT/llamacpp/llamacpp_bf16.json" 2>&1 | tail -6
[ -n "${4:-}" ] && timeout 240 python3 eval/llamacpp_bench.py --bin $L/build/bin --model $G/model-bf16.gguf \
  --ncmoe "$4" --load-mode mmap --out "$OUT/llamacpp/llamacpp_bf16_mmap.json" 2>&1 | tail -6

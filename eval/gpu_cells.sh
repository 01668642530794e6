#!/usr/bin/env bash
# Device call, right after eval/gpu_llamacpp.sh on the same machine (its Q4_K_M file is in /dev/shm/gguf), so that
# these figures share llama.cpp's run. Carry `.tok`, and `.ab_base` for the A/B part (an older checkout of this
# engine, e.g. `git archive <commit> hybrid cost_model eval run.py calibrate.py | tar -x -C .ab_base`). PARTS, in
# order (default "ab q4k8 q4ksmall bf16"; each call must end within the device's 10 minutes: with both modes, give
# each part a call of its own):
#   ab        decode at 8 GiB on the Q4_K_M file (batch AB_BATCH, default 1), this code, the older one, this code
#             again, phase logs (profile_layers.py): $OUT/ab/{this,base,this2}.json; if this code fails there, the
#             later parts run the older one;
#   q4k8      the Q4_K_M file at 8 GiB, batch 1 and 16, prompts 128 and 512: $OUT/gguf_q4k/8GiB/results.json;
#   q4ksmall  the Q4_K_M file at 6 and 4 GiB, batch 1, prompt 128: $OUT/gguf_q4k/<budget>/results.json;
#   bf16      bf16 at 12 GiB, batch 1 and 16, prompt 128: $OUT/hybrid/results.json;
#   profile   phase logs (profile_layers.py) on the Q4_K_M file at 8 GiB, batch 1, hybrid with and without gate
#             prefetch: $OUT/profile/{none,gate}.json;
#   fetch16   a phase log of mode fetch at batch 16, 8 GiB, 64 tokens (does its PCIe backlog, the planner's input,
#             grow with the run? eval/NOTES.md q2k (4)): $OUT/profile/fetch16.json;
#   hybrid16  a phase log of hybrid at batch 16, 8 GiB (where a batch-16 step's time goes between the planned layers'
#             spans and the GPU's pieces): $OUT/profile/hybrid16.json;
#   trace     prefill traces with 4 decode steps (prefill_trace.py: torch.profiler and the phase log) on the Q4_K_M
#             file at 8 GiB, hybrid, batch 16 prompt 128 and batch 1 prompt 512 (where TTFT goes; how long a copy
#             takes while the CPU lane runs): $OUT/trace/prefill_b<bs>_p<len>.json;
#   batches   eval/probes/batch_sizes_check.py: continuous batching on the GPU (decode graphs of every batch size in one
#             shared pool) against each sequence alone, small model, modes gpu and hybrid: $OUT/batch_sizes_check.json;
#   eager     the 8 GiB cells with every prefill eager (--prefill-graphs off: a prompt of a new length, once its
#             kernels are compiled; the server always): $OUT/gguf_q4k/8GiB_eager/results.json;
#   long      a 3,072-token prompt on the Q4_K_M file at 8 GiB, batch 1, hybrid (does the peak stay within the
#             budget when prefill fills the workspace?): $OUT/gguf_q4k/8GiB_long/results.json.
# MODES: the cells' modes (default hybrid,hybrid+gate; session 16's lease ran hybrid alone, ~9 minutes for all parts).
#   [MODES=...] [PARTS=...] bash eval/gpu_cells.sh
source eval/device_setup.sh gguf_q4k q4k
export PYTHONPATH=/dev/shm/llama-src/llama.cpp/gguf-py
M=/dev/shm/gguf/model-Q4_K_M.gguf
ROOT=$PWD
MODES=${MODES:-hybrid,hybrid+gate}
for part in ${PARTS:-ab q4k8 q4ksmall bf16}; do
  case $part in
    ab)
      mkdir -p "$OUT/ab"
      for v in this base this2; do                  # bracketed: the host's speed drifts within a lease
        dir=$ROOT; [ $v = base ] && dir=$ROOT/.ab_base
        echo "== $v"; python3 "$ROOT/eval/probes/host_speed.py" --line
        (cd "$dir" && timeout 100 python3 eval/probes/profile_layers.py --model $M --experts q4k --gpu-memory 8GiB \
          --max-seq-len 640 --mode hybrid --prefetch none --batch-size "${AB_BATCH:-1}" --out "$OUT/ab/$v.json" 2>&1 \
          | grep -vE "it/s|%\|" | tail -13)
      done
      [ -s "$OUT/ab/this.json" ] || { echo "this code failed: the cells run the older one"; cd "$ROOT/.ab_base"; } ;;
    q4k8)
      CELL_TIMEOUT=400 bash eval/gpu_gguf.sh 8GiB --modes "$MODES" --batch-sizes 1,16 --prompt-lens 128,512 \
        --new-tokens 64 ;;
    q4ksmall)
      CELL_TIMEOUT=200 bash eval/gpu_gguf.sh "6GiB 4GiB" --modes "$MODES" --batch-sizes 1 --prompt-lens 128 \
        --new-tokens 64 ;;
    bf16)
      source eval/device_setup.sh hybrid bf16
      timeout 300 python3 eval/compare_modes.py --model /dev/shm/v2lite --experts bf16 --modes "$MODES" \
        --gpu-memory 12GiB --batch-sizes 1,16 --prompt-lens 128 --new-tokens 64 --out-dir "$OUT/hybrid" 2>&1 \
        | grep -v "it/s\]" | tail -4
      rm -rf "$OUT/hybrid/refs" "$OUT/hybrid"/*.png "$OUT/hybrid"/*.csv ;;
    profile)
      mkdir -p "$OUT/profile"
      for pf in none gate; do
        timeout 100 python3 eval/probes/profile_layers.py --model $M --experts q4k --gpu-memory 8GiB \
          --max-seq-len 640 --mode hybrid --prefetch $pf --batch-size 1 --out "$OUT/profile/$pf.json" 2>&1 \
          | grep -vE "it/s|%\|" | tail -16
      done ;;
    fetch16)
      mkdir -p "$OUT/profile"
      timeout 150 python3 eval/probes/profile_layers.py --model $M --experts q4k --gpu-memory 8GiB --max-seq-len 640 \
        --mode fetch --batch-size 16 --out "$OUT/profile/fetch16.json" 2>&1 | grep -vE "it/s|%\|" | tail -8 ;;
    hybrid16)
      mkdir -p "$OUT/profile"
      timeout 150 python3 eval/probes/profile_layers.py --model $M --experts q4k --gpu-memory 8GiB --max-seq-len 640 \
        --mode hybrid --batch-size 16 --out "$OUT/profile/hybrid16.json" 2>&1 | grep -vE "it/s|%\|" | tail -16 ;;
    trace)
      mkdir -p "$OUT/trace"
      for cell in "16 128" "1 512"; do
        read -r bs len <<< "$cell"
        timeout 150 python3 eval/probes/prefill_trace.py --model $M --experts q4k --gpu-memory 8GiB --max-seq-len 640 \
          --mode hybrid --batch-size "$bs" --prompt-len "$len" --decode-steps 4 \
          --out "$OUT/trace/prefill_b${bs}_p${len}.json" 2>&1 \
          | grep -vE "it/s|%\|" | tail -12
      done ;;
    batches)
      timeout 120 python3 eval/probes/batch_sizes_check.py --out "$OUT/batch_sizes_check.json" 2>&1 | tail -3 ;;
    eager)
      timeout 200 python3 eval/compare_modes.py --model $M --experts q4k --gpu-memory 8GiB --modes hybrid \
        --batch-sizes 1,16 --prompt-lens 128,512 --new-tokens 16 --prefill-graphs off \
        --out-dir "$OUT/gguf_q4k/8GiB_eager" 2>&1 | grep -v "it/s\]" | tail -6
      rm -rf "$OUT/gguf_q4k/8GiB_eager/refs" "$OUT/gguf_q4k/8GiB_eager"/*.png "$OUT/gguf_q4k/8GiB_eager"/*.csv ;;
    long)
      timeout 200 python3 eval/compare_modes.py --model $M --experts q4k --gpu-memory 8GiB --modes hybrid \
        --batch-sizes 1 --prompt-lens 3072 --new-tokens 16 --out-dir "$OUT/gguf_q4k/8GiB_long" 2>&1 \
        | grep -v "it/s\]" | tail -4
      rm -rf "$OUT/gguf_q4k/8GiB_long/refs" "$OUT/gguf_q4k/8GiB_long"/*.png "$OUT/gguf_q4k/8GiB_long"/*.csv ;;
    *) echo "error: unknown part $part (ab, q4k8, q4ksmall, bf16, profile, fetch16, hybrid16, trace, batches, eager," \
            "long)"; exit 2 ;;
  esac
done

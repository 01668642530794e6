#!/usr/bin/env bash
# Device call: decode under CPU load on the GPU box (eval/contention.py: 0, 1, 2 busy processes), hybrid at
# 12 GiB, batch 1, with and without gate prefetch; mode auto's choice with and without a budget. An older checkout
# in ./.old (optional, carried) is measured the same way for a before/after on one machine.
source eval/device_setup.sh contention
python3 -m hybrid.kernels.cpu_kernel >/dev/null
for budget in "" "--gpu-memory 12GiB"; do
  python3 run.py --model /dev/shm/v2lite $budget --max-new-tokens 8 2>&1 | grep -E "mode auto|^\[" | tail -2
done
bench="--model /dev/shm/v2lite --mode hybrid --gpu-memory 12GiB --new-tokens 64 --busy 0,1,2 --rounds ${ROUNDS:-4}"
python3 eval/contention.py $bench --prefetch gate --out "$OUT/contention/h200_hybrid_gate.json" 2>&1 | tail -5
python3 eval/contention.py $bench --out "$OUT/contention/h200_hybrid.json" 2>&1 | tail -5
if [ -d .old/hybrid ]; then
  (cd .old && HYBRID_CACHE=/dev/shm/hc_old python3 -m hybrid.kernels.cpu_kernel >/dev/null && cp /dev/shm/hc/costs.json /dev/shm/hc_old/ \
   && HYBRID_CACHE=/dev/shm/hc_old python3 eval/contention.py $bench --prefetch gate \
      --out "$OUT/contention/h200_hybrid_gate_before.json" 2>&1 | tail -5)
fi

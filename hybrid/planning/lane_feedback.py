"""What the executor learns about its lanes while it runs, fed back to the planner (`LaneState`).

Calibration runs apart from the engine, and fresh machines of one kind differ (a 1-token CPU expert cost
0.20-0.29 ms in the engine on different H200 boxes), so two running means per token count correct the model:
the host lag from issuing a layer's copies to starting its CPU experts, and the CPU lane's measured time relative
to the calibrated one. A token count not seen yet borrows the nearest one seen on its side of the decode/prefill
line (a prompt of a new length plans with what the last prefill learned, not with no lag at all). A third running
mean, of measured minus modelled layer time, corrects the predicted layer time (what the next layer's prefetch
has room for, and the layer-time figures); it does not change which plan wins. Pure Python."""
from __future__ import annotations

import math

from cost_model.costs import CostModel

LAG_CAP_MS = 1.0               # decode: a sample above this is not lag (a CUDA-graph capture, a first call)
PREFILL_LAG_CAP_MS = 4.0       # prefill's CPU experts start after its GPU waves are queued: ~1.6 ms at 256 tokens
SCALE_RANGE = (0.4, 2.5)       # the CPU-cost correction stays within this
KEEP = 0.9                     # weight of the old mean per sample
DECAY = 0.98                   # lag kept per layer that ran no CPU experts
BIAS_CAP_MS = (2.0, 20.0)      # a layer-time residual sample is clipped to this (decode, prefill)


def _mean(table: dict[int, float], key: int, value: float) -> None:
    old = table.get(key)
    table[key] = value if old is None else KEEP * old + (1 - KEEP) * value


class LaneFeedback:
    def __init__(self, decode_tokens: int = 16):
        self.decode_tokens = decode_tokens   # token counts up to this are decode steps, above it prefill chunks
        self.lag: dict[int, float] = {}      # tokens -> ms from copies issued to CPU lane start (< 0: before)
        self.scale: dict[int, float] = {}    # tokens -> measured / modelled CPU lane time
        self.bias: dict[int, float] = {}     # tokens -> measured minus modelled layer time, ms

    def _get(self, table: dict[int, float], T: int, default: float) -> float:
        if T in table:
            return table[T]
        side = [k for k in table if (k <= self.decode_tokens) == (T <= self.decode_tokens)]
        return table[min(side, key=lambda k: abs(math.log(k / T)))] if side else default

    def lag_ms(self, T: int) -> float:
        return self._get(self.lag, T, 0.0)

    def cpu_scale(self, T: int) -> float:
        return self._get(self.scale, T, 1.0)

    def bias_ms(self, T: int) -> float:
        return self._get(self.bias, T, 0.0)

    def note_layer(self, T: int, measured_ms: float, model_ms: float) -> None:
        """A planned layer of T tokens took `measured_ms` where the cost model said `model_ms`."""
        cap = BIAS_CAP_MS[T > self.decode_tokens]
        _mean(self.bias, T, max(-cap, min(measured_ms - model_ms, cap)))

    def note_lag(self, T: int, ms: float | None) -> None:
        """A layer's lag, or None for a layer without CPU experts: the mean decays then, so that one bad
        sample cannot keep the CPU lane shut (an uncapped, non-decaying first version did)."""
        cap = LAG_CAP_MS if T <= self.decode_tokens else PREFILL_LAG_CAP_MS
        if ms is not None:                       # negative: the CPU lane started before the copies
            _mean(self.lag, T, max(-cap, min(ms, cap)))
        elif T in self.lag:
            self.lag[T] *= DECAY

    def note_cpu(self, costs: CostModel, T: int, ms: float, rows: list[int]) -> None:
        """One CPU-lane call that took `ms` for experts with `rows` tokens each."""
        model = costs.cpu_lane_ms(costs.xfer_ms(sum(rows)), sum(costs.cpu_ms(n) for n in rows))
        if model > 0:
            _mean(self.scale, T, min(max(ms / model, SCALE_RANGE[0]), SCALE_RANGE[1]))

"""A layer's CPU experts as the executor runs them: handed to the CPU lane's pool right after planning (collected
once the GPU side is queued), or, where the pool cannot take them, computed on the driving thread then. Inputs come
from the host copy of the layer's input made at the routing sync; outputs go to pinned host rows."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..kernels.cpu_experts import pointer_table
from ..planning.lane_feedback import LaneFeedback
from .accounting import Accounting
from .expert_store import ExpertStore
from .lanes import CpuLane, PinnedBuffer
from .layer_layout import cpu_rows
from .phases import PhaseLog


class CpuWork:
    def __init__(self, lane: CpuLane, store: ExpertStore, feedback: LaneFeedback, acct: Accounting,
                 phases: PhaseLog, hidden: int, pin: bool):
        self.lane, self.store, self.feedback, self.acct, self.phases = lane, store, feedback, acct, phases
        self.ptrs = {layer: pointer_table(views) for layer, views in store.views.items()}
        self.host_in = PinnedBuffer(hidden, store.dtype, pin)
        self.host_out = PinnedBuffer(hidden, store.dtype, pin)

    def start(self, layer: int, cpu: list[int], flat: np.ndarray, counts: np.ndarray, xh: torch.Tensor, K: int,
              into: torch.Tensor | None = None, join: bool = True):
        """Hand the layer's CPU experts to the pool now, before the GPU work is queued, their rows
        computed into `into`'s first rows (default: a buffer of this lane's); -> what `finish` needs, or None
        where they do not fit the pool (then `run` computes them later). join: whether the driving thread joins
        the job when it waits for it (prefill; CpuLane.join)."""
        if not cpu or not self.lane.experts.pool_threads:
            return None
        self.lane.join(join)
        rows, segs = cpu_rows(flat, K, counts, cpu)
        out = self._out(rows.shape[0], into)
        self.lane.experts.use(self.store.layout(layer))
        t0 = time.perf_counter()
        if not self.lane.experts.start_rows(xh, rows, out, self.store.views[layer], self.ptrs[layer], segs):
            return None
        self.phases.mark("cpu_start")
        self.phases.note(cpu_call=self.lane.experts.called)
        return out, t0, segs

    def finish(self, job, T: int, issued: float) -> torch.Tensor:
        """Join the started job -> its output rows [n, Hd]; `issued`: when the layer's copies went out."""
        out, t0, segs = job
        self.feedback.note_lag(T, 1000 * (t0 - issued))     # < 0: the CPU lane starts before the copies
        ms = self.lane.experts.wait()
        self.acct.cpu_call(T, ms, [c for _, _, c in segs])
        self.phases.mark("cpu_end")
        self.phases.note(cpu_lane_ms=ms)
        return out

    def _out(self, n: int, into: torch.Tensor | None) -> torch.Tensor:
        return self.host_out.rows(n) if into is None else into[:n]

    def run(self, layer: int, lay, xh: torch.Tensor, K: int, issued: float,
            into: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's CPU experts, now, on this thread -> output rows [n, Hd] in the layout's CPU order (the
        first rows of `into` if given)."""
        rows = lay.perm[lay.cpu_start:] // K                                              # [n] token of each row
        n = rows.shape[0]
        out = self._out(n, into)
        self.phases.mark("cpu_start")
        t0 = time.perf_counter()
        self.feedback.note_lag(xh.shape[0], 1000 * (t0 - issued))
        self.lane.experts.use(self.store.layout(layer))
        self.lane.experts.run_rows(xh, rows, out, self.store.views[layer], self.ptrs[layer], lay.cpu_segments,
                                   self.host_in.rows(n))
        self.acct.cpu_call(xh.shape[0], 1000 * (time.perf_counter() - t0), [c for _, _, c in lay.cpu_segments])
        self.phases.mark("cpu_end")
        return out

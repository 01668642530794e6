"""Which cached experts a captured decode step may read before the host has seen the routing.

(layer, expert) -> cache slot, -1 where the expert is not cached or its slot is being reused. The table lives in
page-locked host memory, and the guess's lookup kernel reads it there when it runs: the host's writes need no
copy. (Fill kernels that pushed the host's changes before each guess cost ~0.1 ms of host time per decode layer on
the box; a host-to-device copy would queue behind the expert copies on the copy engine.)

A taken guess read the row its host check sees: the host changes a layer's row only in that layer's planned path
(after the check, when the guess is dropped) and, for prefetch, in the previous layer's forward (before the guess is
queued). A prefetched expert's entry goes in before its copy lands, with the copy's event (`guard`): the stream
waits for it (`wait_guarded`) before the next guess is queued."""
from __future__ import annotations

import numpy as np
import torch

from ..model import fused

if fused.triton is not None:
    tl = fused.tl

    @fused.triton.jit
    def _lookup_kernel(table_ptr, idx_ptr, out_ptr, row, N, E: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        m = i < N
        e = tl.load(idx_ptr + i, mask=m, other=0)
        ok = m & (e >= 0) & (e < E)
        s = tl.load(table_ptr + row * E + e, mask=ok, other=0)
        tl.store(out_ptr + i, tl.maximum(s, 0).to(tl.int64), mask=m)


class SlotTable:
    def __init__(self, layers: int, experts: int, device):
        cuda = torch.device(device).type == "cuda"
        self.host = torch.full((layers, experts), -1, dtype=torch.int32, pin_memory=cuda)     # [L, E]
        self.mirror = self.host.numpy()                                                       # the same memory
        self.held: list[set[int]] = [set() for _ in range(layers)]    # each layer's experts with a slot (host check)
        self.guarded = None               # the copy event the stream waits for before the next guess

    def set(self, layer: int, e: int, slot: int) -> None:
        """The expert's slot (-1: none), read by guesses queued from now on."""
        self.mirror[layer, e] = slot
        if slot >= 0:
            self.held[layer].add(e)
        else:
            self.held[layer].discard(e)

    def guard(self, event) -> None:
        """Entries set since the last `wait_guarded` may be read only after `event` has fired. The copies go on
        one stream, in order: the latest event stands for every earlier one."""
        self.guarded = event

    def wait_guarded(self) -> None:
        """Before a guess is queued: the compute stream waits for the guarded copy, if any."""
        if self.guarded is not None:
            torch.cuda.current_stream().wait_event(self.guarded)
            self.guarded = None

    def covers(self, layer: int, experts) -> bool:
        """Whether the table holds a slot for every one of the layer's `experts` (ids, any iterable). A set, not the
        array: at decode the check runs on the critical path, where a NumPy gather-and-compare took ~40 us in the
        engine against 3 in a loop (cold caches after the CPU lane)."""
        return self.held[layer].issuperset(experts)

    def lookup(self, layer: int, idx: torch.Tensor) -> torch.Tensor:
        """idx [T, K] expert ids -> their slots [T, K] int64, 0 where the table has none (a guess then dropped),
        read when the GPU runs it (capturable). Ids outside [0, E) read no memory and give 0: a decode graph's
        capture warms its guess on the routing buffer of a piece captured but not yet run, which holds whatever
        the shared graph pool last kept there (the thirteenth lease's illegal address in the server's warm-up)."""
        E = self.host.shape[1]
        if not fused.on_triton(idx):         # a copy of the row (capturable; on a GPU behind the expert copies)
            row = self.host[layer].to(idx.device, non_blocking=True)                           # [E]
            ok = (idx >= 0) & (idx < E)
            return torch.where(ok, row[idx.clamp(0, E - 1)], 0).clamp_min(0).long()
        out = torch.empty_like(idx, dtype=torch.int64)
        n = idx.numel()
        _lookup_kernel[(1,)](self.host, idx.contiguous(), out, layer, n, E=E,
                             BLOCK=max(16, fused.triton.next_power_of_2(n)))
        return out

"""Pinned layers: the MoE layers whose every expert the cache holds for good, computed without the host.

Under the `layers` cache layout (expert_cache.py) the last MoE layers that fit get a full share: every expert is
placed there at load, in the share's slot of its own number, and nothing is ever evicted (a full share has no
misses to admit). Such a layer needs no plan, so it needs no routing sync: it runs as mode gpu runs it (one grouped
FFN over its share), inside the step's CUDA graphs, and the host goes on queueing. What it served is tallied on the
device (distinct experts and calls per layer, one kernel) and read into the statistics when the forward ends."""
from __future__ import annotations

import torch

from ..model import fused
from .expert_cache import ExpertCache
from .resident import grouped_experts
from .stats import RunStats

if fused.triton is not None:
    tl = fused.tl

    @fused.triton.jit
    def _tally_kernel(idx_ptr, tally_ptr, N, E: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        e = tl.arange(0, E)
        seen = tl.zeros([E], dtype=tl.int32)
        for start in range(0, N, BLOCK):
            ids = tl.load(idx_ptr + start + i, mask=start + i < N, other=-1)
            seen = tl.maximum(seen, tl.max((ids[:, None] == e[None, :]).to(tl.int32), axis=0))
        tl.store(tally_ptr, tl.load(tally_ptr) + tl.sum(seen))
        tl.store(tally_ptr + 1, tl.load(tally_ptr + 1) + 1)


def tally(idx: torch.Tensor, row: torch.Tensor, experts: int) -> None:
    """row [2] int32 += (distinct experts among idx, 1), queued on the device (capturable)."""
    if fused.on_triton(idx):
        _tally_kernel[(1,)](idx.contiguous(), row, idx.numel(), E=fused.triton.next_power_of_2(experts), BLOCK=128)
        return
    seen = torch.zeros(experts, dtype=torch.int32, device=idx.device).index_fill_(0, idx.reshape(-1), 1)
    row[0] += seen.sum()
    row[1] += 1


class PinnedLayers:
    """The cache's pinned layers: `forward` for their calls, `settle` for their statistics."""

    def __init__(self, cache: ExpertCache, layers: list[int], experts: int):
        self.layers = frozenset(layer for layer in layers if cache.pinned(layer))
        self.E = experts
        self.ffn = {layer: cache.share_ffn(layer) for layer in self.layers}
        self.tally = torch.zeros(max(layers, default=0) + 1, 2, dtype=torch.int32,
                                 device=cache.device)                  # [layer, (distinct experts, calls)]
        self.warm_tally = torch.zeros(2, dtype=torch.int32, device=cache.device)

    def __contains__(self, layer: int) -> bool:
        return layer in self.layers

    def forward(self, call, count: bool = True) -> torch.Tensor:
        """The layer's routed output, queued without a host sync (count=False: a warm-up pass, tallied apart)."""
        tally(call.idx, self.tally[call.layer] if count else self.warm_tally, self.E)      # compiled in warm-up
        return grouped_experts(call.x, call.idx, call.w, self.ffn[call.layer], self.E)

    def settle(self, stats: RunStats) -> None:
        """Add what the pinned layers served since the last settle to `stats` (waits for the device: call it
        where the host waits anyway, at the end of a forward)."""
        if not self.layers:
            return
        counts = self.tally.tolist()
        self.tally.zero_()
        x = stats.experts
        for layer in sorted(self.layers):
            hits, calls = counts[layer]
            if calls:
                x.count(layer, hits, 0)
                x.layers += calls
                x.pinned_layers += calls

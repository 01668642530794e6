"""Which cached experts a captured decode step may read before the host has seen the routing.

(layer, expert) -> cache slot, -1 where the expert is not cached, its copy may not have landed, or its slot is
being reused. The host keeps the truth (`mirror`) and pushes it to the device between MoE layers on the compute
stream, so that a graph replayed later reads the state of its launch; `pushed` is what the device holds."""
from __future__ import annotations

import numpy as np
import torch


class SlotTable:
    def __init__(self, layers: int, experts: int, device):
        self.mirror = np.full((layers, experts), -1, dtype=np.int32)
        self.pushed = self.mirror.copy()
        self.device = torch.full((layers, experts), -1, dtype=torch.int32, device=device)     # [L, E]
        self.cuda = torch.device(device).type == "cuda"
        self._bufs = [torch.empty(layers * experts, dtype=torch.int32, pin_memory=self.cuda) for _ in range(2)]
        self._events: list = [None, None]       # the last push from each buffer
        self._turn = 0
        self.dirty = False

    def set(self, layer: int, e: int, slot: int) -> None:
        """The expert's slot (-1: none) from the next push on."""
        if self.mirror[layer, e] != slot:
            self.mirror[layer, e] = slot
            self.dirty = True

    def covers(self, layer: int, experts: np.ndarray) -> bool:
        """Whether the device table, as last pushed, holds a slot for every one of the layer's `experts`."""
        return bool((self.pushed[layer, experts] >= 0).all())

    def push(self) -> None:
        """Queue the mirror's changes to the device table on the current stream (a no-op when nothing changed).
        Two pinned buffers take turns; a buffer is refilled only once its previous copy is done."""
        if not self.dirty:
            return
        i, self._turn = self._turn, self._turn ^ 1
        if self._events[i] is not None:
            self._events[i].synchronize()
        buf = self._bufs[i]
        buf.numpy()[:] = self.mirror.reshape(-1)
        self.device.view(-1).copy_(buf, non_blocking=self.cuda)
        if self.cuda:
            self._events[i] = torch.cuda.Event()
            self._events[i].record()
        self.pushed = self.mirror.copy()
        self.dirty = False

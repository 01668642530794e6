"""Which cached experts a captured decode step may read before the host has seen the routing.

(layer, expert) -> cache slot, -1 where the expert is not cached or its slot is being reused. The host keeps the
truth (`mirror`) and pushes its changes to the device on the compute stream right before a guess is launched, so
that the guess reads the state of its launch; `pushed` is what the device holds. An entry whose copy is still in
flight (a prefetch) comes with that copy's event, `guard`: the push makes the stream wait for it, so the guess
reads the slot only once the copy has landed."""
from __future__ import annotations

import numpy as np
import torch


BULK = 32                 # changes pushed one by one (a fill kernel each) up to this many; more as one copy


class SlotTable:
    def __init__(self, layers: int, experts: int, device):
        self.mirror = np.full((layers, experts), -1, dtype=np.int32)
        self.pushed = self.mirror.copy()
        self.device = torch.full((layers, experts), -1, dtype=torch.int32, device=device)     # [L, E]
        self.changed: set[tuple[int, int]] = set()
        self.guarded = None               # the copy event the next push waits for
        self._bulk: torch.Tensor | None = None

    def set(self, layer: int, e: int, slot: int) -> None:
        """The expert's slot (-1: none) from the next push on."""
        if self.mirror[layer, e] != slot:
            self.mirror[layer, e] = slot
            self.changed.add((layer, e))

    def guard(self, event) -> None:
        """Entries set since the last push may be read only after `event` has fired. The copies go on one stream,
        in order: the latest event stands for every earlier one."""
        self.guarded = event

    def covers(self, layer: int, experts: np.ndarray) -> bool:
        """Whether the device table, as last pushed, holds a slot for every one of the layer's `experts`."""
        return bool((self.pushed[layer, experts] >= 0).all())

    def push(self) -> None:
        """Queue the changes since the last push on the current stream. A few go as fill kernels, their values
        in the launch: no host-to-device copy, which the copy engine would queue behind the expert copies in
        flight on the copy stream (the version that copied the table after every layer ran hybrid+gate at about
        half its former speed on the box). Then the stream waits for the guarded copies."""
        if self.guarded is not None:
            torch.cuda.current_stream().wait_event(self.guarded)
            self.guarded = None
        if not self.changed:
            return
        if len(self.changed) > BULK:                  # the first decode step after a prefill
            self._bulk = torch.from_numpy(self.mirror.copy())
            if self.device.is_cuda:
                self._bulk = self._bulk.pin_memory()       # kept until the next bulk push: the copy reads it
            self.device.copy_(self._bulk, non_blocking=True)
            self.pushed = self.mirror.copy()
        else:
            for layer, e in self.changed:
                self.pushed[layer, e] = slot = self.mirror[layer, e]
                self.device[layer, e].fill_(int(slot))
        self.changed.clear()

"""GPU expert slots: each MoE layer owns a share of slots and a policy; a staging ring takes the rest."""
from __future__ import annotations

import torch

from .cache_policy import make_policy
from .config import ModelConfig


class ExpertCache:
    """slots[s] holds one flat expert. `where[(layer, e)]` -> slot. Staging slots are never looked up."""

    def __init__(self, cfg: ModelConfig, n_slots: int, n_staging: int, dtype: torch.dtype, device,
                 policy: str = "lfu"):
        self.cfg = cfg
        layers = cfg.moe_layers
        n_slots = min(n_slots, len(layers) * cfg.n_routed_experts)
        self.slots = torch.empty(n_slots + n_staging, cfg.expert_numel, dtype=dtype, device=device)
        share, extra = divmod(n_slots, len(layers))
        self.layer_slots: dict[int, list[int]] = {}
        s = 0
        for k, layer in enumerate(layers):
            n = share + (k < extra)
            self.layer_slots[layer] = list(range(s, s + n))
            s += n
        self.n_slots = n_slots
        self.staging = list(range(n_slots, n_slots + n_staging))
        self._next_staging = 0
        self.held: set[int] = set()         # staging slots with a copy made ahead for the next layer, not yet read
        self.where: dict[tuple[int, int], int] = {}
        self.owner: list[tuple[int, int] | None] = [None] * (n_slots + n_staging)
        self.policies = {layer: make_policy(policy) for layer in layers}
        self.ready: list = [None] * (n_slots + n_staging)     # event of the last copy into each slot
        self.free: list = [None] * (n_slots + n_staging)      # event after the last compute from each slot
        self.resident: dict[int, set[int]] = {layer: set() for layer in layers}   # live: read, never modify
        self.order: dict[int, list | None] = {layer: None for layer in layers}     # prepared eviction order
        self.views = list(self.slots.unbind(0))                                     # slot s as a [numel] view

    def cached(self, layer: int) -> set[int]:
        return set(self.resident[layer])

    def touch(self, layer: int, experts) -> None:
        pol = self.policies[layer]
        for e in experts:
            pol.touch((layer, e))
        self.order[layer] = None

    def _bind(self, slot: int, key: tuple[int, int]) -> None:
        old = self.owner[slot]
        if old is not None:
            del self.where[old]
            self.resident[old[0]].discard(old[1])
            self.policies[old[0]].remove(old)
        self.owner[slot], self.where[key] = key, slot
        self.resident[key[0]].add(key[1])

    def prepare(self, layer: int) -> None:
        """Rank the layer's residents for eviction now, off the critical path, so that `admit` is O(1).

        Exact as long as nothing but this layer's own forward touches its keys in between: a decay step
        scales every LFU score alike, and keys touched in a forward are protected during it."""
        self.order[layer] = self.policies[layer].ranked((layer, e) for e in self.resident[layer])

    def place(self, layer: int, e: int) -> int | None:
        """Initial placement into a free slot of the layer, bypassing the policy; None when full."""
        if len(self.resident[layer]) >= len(self.layer_slots[layer]):
            return None
        free = next((s for s in self.layer_slots[layer] if self.owner[s] is None), None)
        if free is not None:
            self._bind(free, (layer, e))
            self.policies[layer].insert((layer, e))
            self.order[layer] = None
        return free

    def admit(self, layer: int, e: int, protected: set[int]) -> int | None:
        """A slot for a fetched expert, evicting the policy's victim; None if the policy or space says no."""
        pol = self.policies[layer]
        if not pol.admits:
            return None
        slot = self.place(layer, e)
        if slot is not None:
            return slot
        if self.order[layer] is None:
            self.prepare(layer)
        order = self.order[layer]
        i = next((i for i, k in enumerate(order) if k[1] not in protected and k in self.where), None)
        if i is None:
            return None
        slot = self.where[order.pop(i)]
        self._bind(slot, (layer, e))
        pol.insert((layer, e))
        return slot

    def room(self, layer: int, protected) -> int:
        """How many fetched experts the layer's slots can take without evicting one in `protected`."""
        if not self.policies[layer].admits:
            return 0
        return len(self.layer_slots[layer]) - sum(1 for e in self.resident[layer] if e in protected)

    def staging_slot(self) -> int:
        """The next staging slot of the ring that is not held."""
        for _ in range(len(self.staging)):
            s = self.staging[self._next_staging % len(self.staging)]
            self._next_staging += 1
            if s not in self.held:
                return s
        raise RuntimeError("every staging slot is held by a copy made ahead")

    def tick(self) -> None:
        for pol in self.policies.values():
            pol.tick()

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every slot's w13 [S, 2I, Hd] and w2 [S, Hd, I] as strided views, for grouped GEMMs over slots."""
        I, Hd, n = self.cfg.moe_intermediate_size, self.cfg.hidden_size, self.cfg.expert_numel
        S = self.slots.shape[0]
        w13 = self.slots.as_strided((S, 2 * I, Hd), (n, Hd, 1))
        w2 = self.slots.as_strided((S, Hd, I), (n, I, 1), self.slots.storage_offset() + 2 * I * Hd)
        return w13, w2

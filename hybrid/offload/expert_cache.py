"""GPU expert slots: each MoE layer owns a share of slots and a policy; a staging ring takes the rest.

How the slots are shared between layers is the layout: `spread` gives every MoE layer an equal share; `layers` gives
the last MoE layers whole shares (every expert, as llama.cpp's --n-cpu-moe keeps whole layers on the GPU), the
remainder to the layer before them and nothing to the others. A whole share is pinned (pinned.py): its layer never
misses, so it runs without the host. With routing as uniform as random weights give, both layouts hit as often,
but `layers` puts the misses in fewer layers: fewer routing syncs, and the CPU lane gets several experts at once."""
from __future__ import annotations

import torch

from ..model.config import ModelConfig
from ..kernels.quant_scratch import ScratchFFN
from ..model.quant import ExpertLayout
from .cache_policy import make_policy
from .resident import slot_ffn
from .slot_table import SlotTable


class ExpertCache:
    """GPU slots, each holding one flat expert; a share per MoE layer, with its policy, and a staging ring for
    fetches the layer's share does not keep. A slot's lifecycle goes through methods: admission (admit, place,
    staging_slot), copies in (copied_into / take_copy_event), reads (read_until), holds on staging slots made
    ahead for the next layer (hold / release). Staging slots are never looked up by expert."""

    def __init__(self, cfg: ModelConfig, n_slots: int, n_staging: int, dtype: torch.dtype, device,
                 policy: str = "lfu", quant: ExpertLayout | None = None, layout: str = "spread",
                 whole: dict[int, ExpertLayout] | None = None):
        """n_slots: the layers' shares of slots of quant's size; whole (layout `layers`): layers held whole apart
        from them, each in a tensor of its own layout's size (a GGUF's, smaller than quant's: whole_layers)."""
        self.cfg, self.quant, self.device, self.layout = cfg, quant, torch.device(device), layout
        self.whole, E, layers = whole or {}, cfg.n_routed_experts, cfg.moe_layers
        rest = [layer for layer in layers if layer not in self.whole]
        n_slots = min(n_slots, len(rest) * E)
        row, dtype = (cfg.expert_numel, dtype) if quant is None else (quant.nbytes, torch.uint8)
        self._slots = torch.empty(n_slots + n_staging, row, dtype=dtype, device=device)
        self.layer_slots, s = slot_ids(rest, list(self.whole), n_slots, n_staging, E, layout)
        self.n_slots, self.staging = n_slots, list(range(n_slots, n_slots + n_staging))
        self._apart = {layer: torch.empty(E, lay.nbytes, dtype=torch.uint8, device=device)
                       for layer, lay in self.whole.items()}             # whole layers' own slots
        self._next_staging = 0
        self._held: set[int] = set()        # staging slots with a copy made ahead for the next layer, not yet read
        self._where: dict[tuple[int, int], int] = {}
        self._owner: list[tuple[int, int] | None] = [None] * s
        self._policies = {layer: make_policy(policy) for layer in layers}
        self._ready, self._free = [None] * s, [None] * s     # events: each slot's last copy in, last read
        self._resident: dict[int, set[int]] = {layer: set() for layer in layers}
        self._order: dict[int, list | None] = {layer: None for layer in layers}     # prepared eviction order
        self._views = list(self._slots.unbind(0)) + [v for t in self._apart.values() for v in t.unbind(0)]
        self.table = SlotTable(cfg.num_hidden_layers, cfg.n_routed_experts, device)  # what graphs may read

    @property
    def n_total(self) -> int:
        """Slots of the layers' shares and of the staging ring."""
        return self._slots.shape[0]

    def cached(self, layer: int) -> set[int]:
        return set(self._resident[layer])

    def residents(self, layer: int) -> set[int]:
        """The layer's cached experts, live (no copy: read it, never modify it)."""
        return self._resident[layer]

    def slot_of(self, layer: int, e: int) -> int:
        return self._where[(layer, e)]

    def view(self, slot: int) -> torch.Tensor:
        """Slot `slot` as a flat [numel] tensor: the destination of a copy."""
        return self._views[slot]

    def pinned(self, layer: int) -> bool:
        """Whether the layout is `layers` and the layer's share holds every expert, expert e in its e-th slot (as
        the initial placement puts them): it never misses, so nothing is ever evicted from it. (Under `spread`
        every layer is planned, even when all fit: calibrate.py times that path.)"""
        share = self.layer_slots[layer]
        return self.layout == "layers" and len(share) == self.cfg.n_routed_experts and \
            all(self._owner[s] == (layer, e) for e, s in enumerate(share))

    def share_ffn(self, layer: int):
        """The grouped FFN over a pinned layer's share, indexed by expert: ffn(xs [N, Hd], offs [E]) -> [N, Hd]."""
        if layer in self._apart:
            return slot_ffn(self._apart[layer], self.cfg, self.whole[layer])
        share = self.layer_slots[layer]
        return slot_ffn(self._slots[share[0]:share[-1] + 1], self.cfg, self.quant)

    def is_staging(self, slot: int) -> bool:
        return self.n_slots <= slot < self.n_slots + len(self.staging)

    def value_fn(self, layer: int):
        """The layer's policy's value of an expert (higher: keep), or None if the policy has no such notion."""
        value = getattr(self._policies[layer], "value", None)
        return value and (lambda e: value((layer, e)))

    def hold(self, slot: int) -> None:
        """Keep a staging slot (a copy made ahead for the next layer) out of the ring until `release`."""
        self._held.add(slot)

    def release(self, slot: int) -> None:
        self._held.discard(slot)

    @property
    def held_count(self) -> int:
        return len(self._held)

    def copied_into(self, slot: int, event) -> None:
        """A copy into `slot` was queued; `event` fires when it has landed."""
        self._ready[slot] = event

    def take_copy_event(self, slot: int):
        """The event of the last copy into `slot` not yet waited for (then forgotten), or None."""
        event, self._ready[slot] = self._ready[slot], None
        return event

    def read_until(self, slot: int, event) -> None:
        """The GPU work queued so far reads `slot`: a staging slot may be overwritten once `event` fires (and is no
        longer held)."""
        self._free[slot] = event
        self._held.discard(slot)

    def free_event(self, slot: int):
        """What a new copy into `slot` must wait for (its last reader), or None."""
        return self._free[slot]

    def landed(self, layer: int, members) -> None:
        """The compute stream has waited for the copies into these (expert, slot) pairs: graphs queued from now
        on may read the cached ones through the slot table."""
        for e, s in members:
            if s < self.n_slots and self._owner[s] == (layer, e):
                self.table.set(layer, e, s)

    def in_flight(self, layer: int, members, event) -> None:
        """Copies into these (expert, slot) pairs were queued (a prefetch) and fire `event` when landed: the slot
        table holds the cached ones at once, and the stream waits for `event` before the next guess."""
        members = [(e, s) for e, s in members if s < self.n_slots and self._owner[s] == (layer, e)]
        for e, s in members:
            self.table.set(layer, e, s)
        if members and event is not None:
            self.table.guard(event)

    def touch(self, layer: int, experts) -> None:
        pol = self._policies[layer]
        for e in experts:
            pol.touch((layer, e))
        self._order[layer] = None

    def _bind(self, slot: int, key: tuple[int, int]) -> None:
        old = self._owner[slot]
        if old is not None:
            self.table.set(*old, -1)
            del self._where[old]
            self._resident[old[0]].discard(old[1])
            self._policies[old[0]].remove(old)
        self._owner[slot], self._where[key] = key, slot
        self._resident[key[0]].add(key[1])

    def prepare(self, layer: int) -> None:
        """Rank the layer's residents for eviction now, off the critical path, so that `admit` is O(1).

        Exact as long as nothing but this layer's own forward touches its keys in between: a decay step
        scales every LFU score alike, and keys touched in a forward are protected during it."""
        self._order[layer] = self._policies[layer].ranked((layer, e) for e in self._resident[layer])

    def place(self, layer: int, e: int) -> int | None:
        """Initial placement into a free slot of the layer, bypassing the policy; None when full."""
        if len(self._resident[layer]) >= len(self.layer_slots[layer]):
            return None
        free = next((s for s in self.layer_slots[layer] if self._owner[s] is None), None)
        if free is not None:
            self._bind(free, (layer, e))
            self._policies[layer].insert((layer, e))
            self._order[layer] = None
        return free

    def admit(self, layer: int, e: int, protected: set[int]) -> int | None:
        """A slot for a fetched expert, evicting the policy's victim; None if the policy or space says no."""
        pol = self._policies[layer]
        if not pol.admits:
            return None
        slot = self.place(layer, e)
        if slot is not None:
            return slot
        if self._order[layer] is None:
            self.prepare(layer)
        order = self._order[layer]
        i = next((i for i, k in enumerate(order) if k[1] not in protected and k in self._where), None)
        if i is None:
            return None
        slot = self._where[order.pop(i)]
        self._bind(slot, (layer, e))
        pol.insert((layer, e))
        return slot

    def room(self, layer: int, protected) -> int:
        """How many fetched experts the layer's slots can take without evicting one in `protected`."""
        if not self._policies[layer].admits:
            return 0
        return len(self.layer_slots[layer]) - sum(1 for e in self._resident[layer] if e in protected)

    def staging_slot(self) -> int:
        """The next staging slot of the ring that is not held."""
        for _ in range(len(self.staging)):
            s = self.staging[self._next_staging % len(self.staging)]
            self._next_staging += 1
            if s not in self._held:
                return s
        raise RuntimeError("every staging slot is held by a copy made ahead")

    def tick(self) -> None:
        for pol in self._policies.values():
            pol.tick()

    def grouped(self, lay: ExpertLayout | None = None):
        """ffn(xs [N, Hd], offs [S]) -> [N, Hd] over every common slot, its experts in `lay` (default: quant)."""
        return slot_ffn(self._slots, self.cfg, lay or self.quant)

    def scratch_ffn(self, dtype: torch.dtype, experts: int) -> ScratchFFN | None:
        """For quantized slots, prefill's FFN over a bf16 scratch of `experts` experts: ffn(xs, slot_ends (host));
        None for unquantized slots or no scratch."""
        return None if self.quant is None or experts < 1 else ScratchFFN(self._slots, self.quant, dtype, experts)


def slot_ids(rest: list[int], whole: list[int], n_slots: int, n_staging: int, experts: int,
             layout: str) -> tuple[dict[int, list[int]], int]:
    """Slot ids per layer (the layers `rest` share the n_slots common ones, layer_shares; the staging ring follows;
    then each layer in `whole` has `experts` of its own) -> (ids per layer, how many ids in all)."""
    ids, s = {}, 0
    for layer, n in zip(rest, layer_shares(len(rest), n_slots, experts, layout)):
        ids[layer], s = list(range(s, s + n)), s + n
    s = n_slots + n_staging
    for layer in whole:
        ids[layer], s = list(range(s, s + experts)), s + experts
    return ids, s


def layer_shares(n_layers: int, n_slots: int, experts: int, layout: str) -> list[int]:
    """Slots per MoE layer, in layer order: `spread` equal shares; `layers` whole shares for the last layers, the
    remainder to the one before them."""
    if layout == "spread":
        share, extra = divmod(n_slots, n_layers)
        return [share + (k < extra) for k in range(n_layers)]
    if layout != "layers":
        raise ValueError(f"unknown cache layout {layout!r}: choose layers or spread")
    whole, rest = divmod(n_slots, experts)
    shares = [0] * n_layers + [experts] * whole
    if rest:
        shares[-whole - 1] = rest
    return shares[-n_layers:]


def whole_layers(sizes: dict[int, int], experts: int, cache_bytes: int, slot_bytes: int) -> tuple[list[int], int]:
    """Layers held whole at their own size (`sizes`: bytes of one expert of each layer), smallest first and, among
    equal ones, the last first (layer_shares' order), and the slots of `slot_bytes` left in `cache_bytes`."""
    whole, used = [], 0
    for layer in sorted(sizes, key=lambda layer: (sizes[layer], -layer)):
        if used + experts * sizes[layer] > cache_bytes:
            break
        whole.append(layer)
        used += experts * sizes[layer]
    return whole, (cache_bytes - used) // slot_bytes


class LayerFFNs:
    """ffns(layer): the grouped FFN over the cache's common slots in the layer's own expert layout (store.layout: a
    GGUF's layers may hold Q5_0 or Q8_0 downs in slots of one size), one per layout."""

    def __init__(self, cache: ExpertCache, layout_of):
        self.cache, self.layout_of, self.by = cache, layout_of, {}

    def __call__(self, layer: int):
        lay = self.layout_of(layer)
        if lay not in self.by:
            self.by[lay] = self.cache.grouped(lay)
        return self.by[lay]

"""Decode's guess at an offloaded layer: its routed output as if every pick were cached.

Captured in the step's graph after the router (and after the routing's readback, readback.py), it runs each pick
through the cache slot the slot table gives (slot_table.py) before the host has seen the routing. When the table
holds every pick, the host takes the guess as the layer's output and the GPU never waits for the host's planning;
otherwise it is dropped (picks without a slot read slot 0) and the layer runs the planned way. The guess is the
resident backend's own computation (grouped over slots, one combine), so a taken guess equals mode gpu's output."""
from __future__ import annotations

import torch

from .expert_cache import ExpertCache
from .resident import grouped_experts

GUESS_TOKENS = 2          # decode batches of at most this many tokens guess (more picks rarely all hit)


class Guesses:
    """max_picks: the most picks (tokens x top-k) a guessing call has; 0: no guesses. With prefetch on, the
    experts prefetched for a layer are in the table before their copies land: `wait_copies` before its guess makes
    the stream wait for those copies (slot_table.py), a wait the planned path would mostly make anyway for its hits."""

    def __init__(self, cache: ExpertCache, ffn, max_picks: int):
        self.cache, self.ffn, self.max_picks = cache, ffn, max_picks
        self.static: dict[int, torch.Tensor] = {}        # id(static MoECall) -> its guess (a graph's buffer)
        self.eager: tuple | None = None        # (the last eager call, its guess)

    def wanted(self, call) -> bool:
        """Small calls of layers whose share could hold a token's picks (a layer with none never guesses right)."""
        return call.idx.numel() <= self.max_picks and len(self.cache.layer_slots[call.layer]) >= call.idx.shape[1]

    def wait_copies(self) -> None:
        """Before each guess is queued: the stream waits for the copies the table's new entries await."""
        self.cache.table.wait_guarded()

    def run(self, call) -> None:
        """Queue the guess for `call` (capturable: its lookup reads the slot table when it runs, no host sync)."""
        if not self.wanted(call):
            return
        slots = self.cache.table.lookup(call.layer, call.idx)                            # [T, K]
        out = grouped_experts(call.x, slots, call.w, self.ffn(call.layer), self.cache.n_total)     # [T, Hd]
        if call.static:
            self.static[id(call)] = out
        else:
            self.eager = (call, out)

    def take(self, call, experts) -> torch.Tensor | None:
        """The guess for `call` if the table it read covered every pick (`experts`: the ids picked), else None."""
        if call.static:
            out = self.static.get(id(call))
        else:
            out = self.eager[1] if self.eager and self.eager[0] is call else None
            self.eager = None
        if out is None or not self.cache.table.covers(call.layer, experts):
            return None
        return out

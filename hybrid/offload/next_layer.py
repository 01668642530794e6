"""Copies for the next MoE layer, made while this one runs: prefetch of the experts its router (or a predictor)
guesses, into the next layer's cache share (held staging slots for a layer with no share), and in prefill copies
made ahead into held staging slots."""
from __future__ import annotations

import time

import numpy as np

from ..planning.copy_ahead import CopyAhead
from ..planning.prefetch import Prefetcher
from .accounting import Accounting
from .expert_cache import ExpertCache
from .expert_copies import ExpertCopies, Wave


class NextLayerCopies:
    def __init__(self, moe_layers: list[int], experts: int, cache: ExpertCache, copies: ExpertCopies,
                 acct: Accounting, costs, prefetcher: Prefetcher | None, copy_ahead: CopyAhead | None):
        self.first, self.experts = moe_layers[0], experts
        self.next_layer = dict(zip(moe_layers, moe_layers[1:]))
        self.cache, self.copies, self.acct, self.costs = cache, copies, acct, costs
        self.prefetcher, self.policy = prefetcher, copy_ahead
        self.ahead: dict[int, dict[int, int]] = {}          # layer -> {expert: staging slot} copied ahead for it
        self.max_held = len(cache.staging) // 3             # staging slots a decode prefetch may hold

    def queue(self, layer: int, pred_host, plan, window_ms: float, prefill: bool) -> tuple[int | None, Wave]:
        """Once the layer's GPU work is queued: the next layer's prefetch (pred_host: its guessed experts per
        token, or None), then in prefill the copies made ahead, noted in `plan` -> those copies, still to issue."""
        plan.prefetch = self.choose_prefetch(layer, pred_host)
        if pred_host is not None:             # also with no candidate: the guess is scored for recall
            self.prefetch(layer, pred_host, plan.prefetch, window_ms)
        plan.ahead = self.choose_ahead(layer, pred_host, prefill)
        return self.copy_ahead(layer, plan.ahead)

    def take_ahead(self, layer: int, tokens: dict[int, int], prefill: bool) -> dict[int, int]:
        """The copies made ahead for this layer that it needs (the others' slots are released), after noting
        the PCIe lane's idle time before this prefill layer's routing."""
        ahead = self.ahead.pop(layer, {})
        if self.policy is not None and prefill and layer != self.first:
            self.policy.observe(1000 * (time.perf_counter() - self.copies.clock()))
        for e in [e for e in ahead if e not in tokens]:
            self.cache.release(ahead.pop(e))     # a later copy into the slot queues behind this one
        return ahead

    def choose_prefetch(self, layer: int, pred_host) -> list[int]:
        """The next layer's guessed, uncached experts, best first (pred_host [T, K] guesses per token, or None)."""
        nxt = self.next_layer.get(layer)
        if nxt is None or pred_host is None:
            return []
        return self.prefetcher.choose(pred_host, self.cache.residents(nxt))

    def choose_ahead(self, layer: int, pred_host, prefill: bool) -> list[int]:
        """Prefill: the next layer's uncached experts to copy ahead, as many as the PCIe lane's measured idle gap
        holds, the guessed ones first, then by the cache policy's value (after this layer's prefetch: it skips what
        that admitted)."""
        nxt = self.next_layer.get(layer)
        n = self.policy.count() if nxt is not None and prefill and self.policy is not None else 0
        if n <= 0:
            return []
        predicted = None
        if pred_host is not None:
            votes = np.bincount(pred_host.reshape(-1), minlength=self.experts)
            predicted = [e for e in np.argsort(-votes, kind="stable").tolist() if votes[e]]
        have = self.cache.residents(nxt) | self.ahead.get(nxt, {}).keys()          # prefetched into staging too
        return CopyAhead.choose(n, self.experts, have, self.cache.value_fn(nxt), predicted)

    def copy_ahead(self, layer: int, experts: list[int]) -> tuple[int | None, Wave]:
        """Staging slots, held until the next layer's GEMM over its hits has read them, for the planned copies made
        ahead -> (next layer, [(expert, slot)]) for the caller to copy in."""
        nxt = self.next_layer.get(layer)
        if nxt is None or not experts:
            return nxt, []
        wave = []
        for e in experts:
            slot = self.cache.staging_slot()
            self.cache.hold(slot)
            wave.append((e, slot))
        self.ahead[nxt] = {**self.ahead.get(nxt, {}), **dict(wave)}
        self.policy.issued = len(wave)
        self.acct.stats.experts.copied_ahead += len(wave)
        return nxt, wave

    def prefetch(self, layer: int, pred_host, candidates: list[int], window_ms: float) -> None:
        """Copy the planned candidates into the next layer's share: only what the PCIe lane can move before that
        layer routes (this layer's predicted `window_ms`, less the backlog now)."""
        nxt = self.prefetcher.next[layer]
        predicted = set(pred_host.reshape(-1).tolist())
        c = self.costs
        room = int((window_ms + c.layer_overhead_ms - self.copies.backlog_ms()) / c.fetch_ms)
        wave, held = [], {}
        for e in candidates[:max(0, room)]:
            slot = self.cache.admit(nxt, e, predicted)
            if slot is None and not self.cache.layer_slots[nxt] and self.cache.held_count < self.max_held:
                slot = held[e] = self.cache.staging_slot()      # a layer with no share: held like a copy ahead
                self.cache.hold(slot)
            if slot is None:
                break
            wave.append((e, slot))
        if held:
            self.ahead[nxt] = {**self.ahead.get(nxt, {}), **held}
            self.acct.stats.experts.copied_ahead += len(held)
        self.cache.in_flight(nxt, wave, self.copies.issue(nxt, wave))    # the next layer's guess may read them
        self.acct.prefetch(nxt, predicted, {e for e, _ in wave})     # nxt's eviction order: at its entry

"""The PCIe lane in terms of experts and slots: copies from the pinned store into GPU cache or staging slots, when
each lands, when each staging slot may be overwritten, and the lane's clock (when what is queued should be done,
by the cost model)."""
from __future__ import annotations

import time

from .accounting import Accounting
from .expert_cache import ExpertCache
from .expert_store import ExpertStore
from .lanes import CopyLane

Wave = list[tuple[int, int]]        # (expert, slot) pairs copied back to back


class ExpertCopies:
    def __init__(self, lane: CopyLane, cache: ExpertCache, store: ExpertStore, acct: Accounting, fetch_ms: float):
        self.lane, self.cache, self.store, self.acct, self.fetch_ms = lane, cache, store, acct, fetch_ms
        self.until = 0.0                 # when the copies queued so far should be done (perf_counter, s)
        self.last = None                 # the last wave's completion event (the stream runs waves in order)

    def clock(self) -> float:
        """When the copies queued so far should be done (perf_counter, s), by the cost model, pulled back to now
        once the last one has landed: copies faster than modelled would otherwise leave a backlog that grows with
        the run (fetch mode's layer predictions did)."""
        now = time.perf_counter()
        if self.until > now and self.lane.done(self.last):
            self.until = now
        return self.until

    def backlog_ms(self) -> float:
        """Copy time still queued on the lane, by the cost model."""
        return max(0.0, 1000 * (self.clock() - time.perf_counter()))

    def slot_for(self, layer: int, e: int, protected) -> int:
        """The layer's cache admits the expert (evicting none in `protected`), or it goes to a staging slot."""
        slot = self.cache.admit(layer, e, protected)
        return self.cache.staging_slot() if slot is None else slot

    def issue(self, layer: int, wave: Wave):
        """Copy a wave of experts into their slots, back to back; a staging slot waits until its last reader is
        done. -> the wave's completion event (None on CPU or for no copies)."""
        if not wave:
            return None
        if len({s for _, s in wave}) < len(wave):
            raise RuntimeError(f"layer {layer}: two copies of one wave into one slot ({wave})")
        cache = self.cache
        after = [cache.free_event(s) for _, s in wave if cache.is_staging(s) and cache.free_event(s) is not None]
        bufs = self.store.buffers[layer]                 # each at the layer's own size (Q4_K_M's q5 downs)
        done = self.lane.copy_many([(cache.view(s), bufs[e]) for e, s in wave], after)
        ms = len(wave) * self.fetch_ms * self.store.size_ratio(layer)           # at the layer's own size
        self.until = max(self.clock(), time.perf_counter()) + ms / 1000
        self.last = done
        for _, s in wave:
            cache.copied_into(s, done)
        self.acct.copies(len(wave), self.store.nbytes_of(layer))
        return done

    def admit_and_issue(self, layer: int, experts: list[int], tokens: dict[int, int]) -> Wave:
        """Decode: every copy in one wave (one completion event), the slots admitted first: a few us each, where a
        second wave's event, clock and bookkeeping cost more than the first copy gained by going out alone."""
        wave = [(e, self.slot_for(layer, e, tokens)) for e in experts]
        self.issue(layer, wave)
        return wave

    def wait_landed(self, members: Wave) -> None:
        """The compute stream waits for the copies into these slots (each event once)."""
        waited = set()
        for _, s in members:
            ev = self.cache.take_copy_event(s)     # later work on this stream is ordered after it anyway
            if ev is not None and id(ev) not in waited:
                self.lane.wait(ev)
                waited.add(id(ev))

    def read_queued(self, members: Wave) -> None:
        """Staging slots among `members` may be overwritten once the GPU work queued so far has read them."""
        staged = [s for _, s in members if self.cache.is_staging(s)]
        if staged:
            done = self.lane.event()
            for s in staged:
                self.cache.read_until(s, done)

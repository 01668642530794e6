"""Carries out per-layer plans: fetches on the copy stream, GPU experts, CPU experts on this thread, one combine.

`OffloadedExperts` is the ExpertBackend of modes fetch, cpu and hybrid; the planner decides, this executes.
GPU experts run as grouped GEMMs over the cache slots: at decode (up to `decode_tokens` tokens) one for the hits at
once and one for the fetched experts once all their copies land, fixed-shape and replayed from CUDA graphs
(`layer_graph.py`); in prefill one for the hits and one per wave of fetches, as the copies land."""
from __future__ import annotations

import time

import numpy as np
import torch

from ..kernels import host_read
from ..model.config import ModelConfig
from ..planning.copy_ahead import CopyAhead
from ..planning.lane_feedback import LaneFeedback
from ..planning.prefetch import Prefetcher
from ..planning.scheduler import LaneState, LayerPlan
from .accounting import Accounting, LayerOutcome
from .cpu_work import CpuWork
from .expert_cache import ExpertCache, LayerFFNs
from .expert_copies import ExpertCopies
from .expert_store import ExpertStore
from .guesses import GUESS_TOKENS, Guesses
from .lanes import CopyLane, CpuLane, PinnedBuffer
from .layer_graph import LayerGraphs, combine
from .layer_layout import layer_layout
from .layer_timer import LayerTimer
from .next_layer import NextLayerCopies
from .phases import PhaseLog
from .pinned import PinnedLayers
from .readback import RoutingReadback
from .wave_groups import WaveGroups
from .stats import RunStats


class OffloadedExperts:
    capturable = False

    def __init__(self, cfg: ModelConfig, store: ExpertStore, cache: ExpertCache, planner, device: torch.device,
                 cpu_lane: CpuLane, prefetcher: Prefetcher | None = None, decode_tokens: int = 16,
                 copy_ahead: CopyAhead | None = None, scratch_experts: int = 0, graphs: bool = True):
        self.cfg, self.store, self.cache, self.planner = cfg, store, cache, planner
        self.device, self.copy, self.cpu = device, CopyLane(device), cpu_lane
        self.prefetcher, self.decode_tokens, self.wants_guess = prefetcher, decode_tokens, prefetcher is not None
        pin = device.type == "cuda"
        self.routing = RoutingReadback(cfg.hidden_size, store.dtype, pin)
        self.index_buf = PinnedBuffer(1, torch.int32, pin)
        self.ffn = LayerFFNs(cache, store.layout)             # ffn(layer): over the common slots
        self.timer = LayerTimer(self.copy.cuda)
        self.phases = PhaseLog()
        self.plan: LayerPlan | None = None     # the current layer's plan
        self.predicted_ms = 0.0                # its predicted time, with the online correction (LaneFeedback)
        self.issued = 0.0                      # when the current layer's copies were issued (perf_counter, s)
        self.feedback = LaneFeedback(decode_tokens)
        self.pinned = PinnedLayers(cache, cfg.moe_layers, cfg.n_routed_experts)
        first = next((layer for layer in cfg.moe_layers if layer not in self.pinned), cfg.moe_layers[0])
        self.acct = Accounting(first, cache, prefetcher, self.feedback, planner.costs)
        self.copies = ExpertCopies(self.copy, cache, store, self.acct, planner.costs.fetch_ms)
        self.next = NextLayerCopies(cfg.moe_layers, cfg.n_routed_experts, cache, self.copies, self.acct,
                                    planner.costs, prefetcher, copy_ahead)
        self.cpu_work = CpuWork(cpu_lane, store, self.feedback, self.acct, self.phases, cfg.hidden_size, pin)
        self.layer_graphs = LayerGraphs(self.ffn, cache.n_total, cfg.hidden_size, self.copy.cuda, graphs)
        # decode's guesses (guesses.py), launched by the step's graphs (engine/graphs.py) before forward
        self.guesses = Guesses(cache, self.ffn, cfg.num_experts_per_tok * GUESS_TOKENS)
        self.waves = WaveGroups(self.copies, self.ffn, cache.scratch_ffn(store.dtype, scratch_experts), store.layout)

    def set_threads(self, threads: int) -> None:
        self.cpu.set_threads(threads)

    def begin(self, stats: RunStats) -> None:
        self.acct.stats = stats
        self.timer.rewind()

    def end(self, stats: RunStats) -> None:
        self.acct.settle()
        self.pinned.settle(stats)
        stats.layer_meas_ms, stats.layer_pred_ms, stats.layer_model_ms = self.timer.read()
        if self.prefetcher:
            stats.experts.prefetch_recall = self.prefetcher.recall

    def in_graph(self, call) -> bool:
        return call.layer in self.pinned          # no routing sync (pinned.py): the step's graphs take it in

    def warm(self, call) -> torch.Tensor:
        """An output for a warm-up pass before a capture (nothing counted, nothing planned)."""
        return self.pinned.forward(call, count=False) if call.layer in self.pinned else torch.zeros_like(call.x)

    def readback(self, call) -> None:
        """Queue the layer's routing sync now (before its guess; forward waits for it)."""
        self.routing.queue(call, self.prefetcher is not None and call.pred is not None)

    def forward(self, call) -> torch.Tensor:
        """Critical path only: routing -> plan -> copies issued -> GPU work queued -> CPU experts computed here
        while copies and GPU work proceed -> combine; or, where the slot table covered every pick, the `guess`.
        Bookkeeping (policy, statistics, eviction order) waits for the next layer's routing sync."""
        layer, idx = call.layer, call.idx
        if layer in self.pinned:
            return self.pinned.forward(call)
        (T, K), pred = idx.shape, call.pred if self.prefetcher else None
        self.phases.start(layer)
        self.acct.settle()
        if self.prefetcher is not None:              # re-rank with the experts prefetched for this layer, while
            self.cache.prepare(layer)                # the GPU still runs its attention (off the critical path)
        for sample in self.timer.finished():                 # earlier layers' times, read while the GPU routes
            self.feedback.note_layer(*sample)
        self.phases.mark("settled")
        host, xh = self.routing.take(call, pred is not None)         # the one sync
        start = self.timer.mark()
        self.phases.mark("routed")
        flat = host[:, :K].reshape(-1)                                                    # [T*K]
        counts = np.bincount(flat, minlength=self.cfg.n_routed_experts)
        nz = np.flatnonzero(counts)
        tokens = dict(zip(nz.tolist(), counts[nz].tolist()))
        guessed = self.guesses.take(call, tokens)
        if guessed is not None:
            return self._all_cached(call, host, tokens, guessed)
        small = T <= self.decode_tokens              # decode: every copy in one wave, bounded by the staging room
        plan, ahead = self._plan(layer, host, tokens, small)
        self.plan, self.predicted_ms = plan, plan.predicted_ms + self.feedback.bias_ms(T)
        self.phases.mark("planned")
        graph = self.layer_graphs(call) if plan.one_wave else None
        self.phases.mark("graph")
        if plan.one_wave:          # decode: copies out before the CPU lane streams weights (which slows the host)
            fetch, self.issued = self.copies.admit_and_issue(layer, plan.fetch, tokens), time.perf_counter()
            self.phases.mark("issued")
        job = self.cpu_work.start(layer, plan.cpu, flat, counts, xh, K, graph and graph.host.cpu, join=not small)
        hits = [(e, ahead[e] if e in ahead else self.cache.slot_of(layer, e)) for e in plan.hits]
        self.phases.note(n_hit=len(hits), n_fetch=len(plan.fetch), n_cpu=len(plan.cpu), n_ahead=len(ahead))
        if plan.one_wave:
            out = self._decode(call, graph, hits, fetch, plan.cpu, flat, counts, xh, host, job)
        else:
            waves = [[(e, self.copies.slot_for(layer, e, tokens)) for e in w] for w in plan.waves]
            fetch = [f for w in waves for f in w]
            for wave in waves[:2]:
                self.copies.issue(layer, wave)
            self.issued = time.perf_counter()
            out = self._grouped(call, hits, waves, plan.cpu, flat, counts, xh, host, job)
        self.timer.span(start, self.predicted_ms, plan.predicted_ms, T)
        self.phases.mark("done")
        self.acct.defer(LayerOutcome(layer, tokens, len(plan.hits), len(fetch), len(plan.cpu),
                                     sum(1 for e in plan.hits if e in ahead)))
        return out

    def _all_cached(self, call, host, tokens: dict[int, int], out: torch.Tensor) -> torch.Tensor:
        """Every pick was in the slot table the guess read: its output stands; the next layer's prefetch."""
        self.plan = self.planner.all_hits(tokens)
        self.predicted_ms = self.plan.predicted_ms           # the planned layers' correction is not this one's
        self.phases.note(n_hit=len(tokens), n_fetch=0, n_cpu=0, n_ahead=0, guessed=1)
        self._prefetch_next(call, host)
        self.feedback.note_lag(call.idx.shape[0], None)          # no layer time: the planner did not plan it
        self.phases.mark("done")
        self.acct.defer(LayerOutcome(call.layer, tokens, len(tokens), 0, 0, 0, guessed=True))
        return out

    def _plan(self, layer: int, host: np.ndarray, tokens: dict[int, int], small: bool) -> tuple[LayerPlan, dict]:
        """The planner's plan for the layer, and the copies made ahead for it it uses ({expert: staging slot}).
        A decode layer whose experts are all cached skips the lanes' state: nothing is left to choose."""
        T, K = host.shape[0], self.cfg.num_experts_per_tok
        resident = self.cache.residents(layer)
        if small and not self.next.ahead and resident.issuperset(tokens):
            return self.planner.all_hits(tokens), {}
        penalty = 0.0
        if host.shape[1] > K:                        # the next layer's guesses ride along: a copy's worth
            c = self.planner.costs
            penalty = self.prefetcher.penalty_ms(layer, host[:, K:], self.cache.residents, c.fetch_ms,
                                                 c.cpu_ms(1) * self.feedback.cpu_scale(T))
        ahead = self.next.take_ahead(layer, tokens, not small)
        staging = len(self.cache.staging) - self.cache.held_count        # held: copies made ahead (hits now)
        room = staging + self.cache.room(layer, tokens) if small else None
        lanes = LaneState(self.copies.backlog_ms(), self.feedback.lag_ms(T), self.feedback.cpu_scale(T), penalty,
                          room, self.waves.wave_size(staging), self.store.size_ratio(layer))
        self.phases.note(backlog_ms=lanes.backlog_ms, cpu_scale=lanes.cpu_scale, cpu_lag_ms=lanes.cpu_lag_ms, room=room)
        return self.planner.plan(tokens, resident | ahead.keys() if ahead else resident, lanes), ahead

    def _decode(self, call, graph, hits, fetch, cpu, flat, counts, xh, host, job) -> torch.Tensor:
        """Hits at once, fetched experts behind their copies, CPU experts here meanwhile (into the graph's host
        rows): three fixed-shape pieces (replayed from CUDA graphs at decode)."""
        lay = layer_layout(flat, counts, [hits, fetch], cpu, self.cache.n_total)
        self.copies.wait_landed(hits)                # prefetched hits may still be in flight
        self.phases.mark("launched")
        n_hit = lay.rows[0][1]
        graph.hits(lay.perm, lay.offs[0], lay.offs[1] + n_hit, n_hit, lay.cpu_start)
        self.copies.wait_landed(fetch)
        graph.fetched(bool(fetch))
        self.copies.read_queued(hits + fetch)
        self.cache.landed(call.layer, hits + fetch)  # the stream waited for their copies: graphs may read them
        self._prefetch_then_cpu(call, host, lay, xh, job, cpu_out=graph.host.cpu)
        return graph.post()

    def _grouped(self, call, hits, waves, cpu, flat, counts, xh, host, job) -> torch.Tensor:
        """The general case (prefill, large batches): hits, then one grouped GEMM per wave of fetches."""
        x, T, K = call.x, *call.idx.shape
        lay = layer_layout(flat, counts, [hits] + waves, cpu, self.cache.n_total)
        buf = self.index_buf.pack(lay.perm, lay.offs.reshape(-1))
        dev = torch.empty_like(buf, device=self.device)
        host_read.load(dev, buf)                     # not behind the waves' copies on the copy engine
        perm = dev[:T * K].long()                                                        # [T*K]
        offs = dev[T * K:].view(len(waves) + 1, -1)                                      # [G, S]
        tok = perm // K
        xs = x.index_select(0, tok)                                                        # [T*K, Hd]
        ys = torch.empty_like(xs)
        self.phases.mark("launched")
        self.waves.run(call.layer, hits, waves, lay, offs, xs, ys)
        self.cache.landed(call.layer, hits + [f for w in waves for f in w])
        wsort = call.w.reshape(-1)[perm].unsqueeze(1)                                     # [T*K, 1]
        later = self._prefetch_then_cpu(call, host, lay, xh, job, ys=ys)
        out = combine(x, tok, ys, wsort)
        self.copies.issue(*later)
        return out

    def _prefetch_then_cpu(self, call, host, lay, xh: torch.Tensor, job, ys: torch.Tensor | None = None,
                           cpu_out: torch.Tensor | None = None) -> tuple[int | None, list]:
        """Once the GPU side is queued: the next layer's copies (_prefetch_next), then this layer's CPU experts
        (from the pool if `job` started them there, else computed now, into `cpu_out` if given), copied into
        the rows of `ys` past lay.cpu_start if given. -> (layer, copies made ahead) to issue once the caller
        has queued the combine: the copy engine runs the CPU results' small copy only after expert copies
        queued before it (prefill traces), so those would hold up this layer's combine."""
        K = call.idx.shape[1]
        later = self._prefetch_next(call, host)
        if lay.cpu_segments:
            out = self.cpu_work.finish(job, xh.shape[0], self.issued) if job else \
                self.cpu_work.run(call.layer, lay, xh, K, self.issued, cpu_out)
            if ys is not None:
                ys[lay.cpu_start:].copy_(out, non_blocking=True)
        else:
            self.feedback.note_lag(xh.shape[0], None)
        return later

    def _prefetch_next(self, call, host) -> tuple[int | None, list]:
        """The next layer's prefetch copies, and in prefill its copies made ahead (-> those still to issue)."""
        T, K = call.idx.shape
        pred = host[:, K:] if self.prefetcher and call.pred is not None else None
        later = self.next.queue(call.layer, pred, self.plan, self.predicted_ms, T > self.decode_tokens)
        self.phases.mark("queued")
        return later

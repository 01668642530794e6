"""Carries out per-layer plans: fetches on the copy stream, GPU experts, CPU experts on this thread, one combine.

`OffloadedExperts` is the ExpertBackend of modes fetch, cpu and hybrid; the planner decides, this executes.
GPU experts run as grouped GEMMs over the cache slots: at decode (up to `decode_tokens` tokens) one for the hits at
once and one for the fetched experts once all their copies land, fixed-shape and replayed from CUDA graphs
(`layer_graph.py`); in prefill one for the hits and one per wave of fetches, as the copies land."""
from __future__ import annotations

import time

import numpy as np
import torch

from .config import ModelConfig
from .expert_cache import ExpertCache
from .expert_copies import ExpertCopies
from .expert_store import ExpertStore
from .experts import grouped_ffn
from .accounting import Accounting, LayerOutcome
from .copy_ahead import CopyAhead
from .cpu_experts import pointer_table
from .lanes import CopyLane, CpuLane, PinnedBuffer
from .layer_graph import LayerGraph, combine
from .layer_layout import cpu_rows, layer_layout
from .layer_timer import LayerTimer
from .phases import PhaseLog
from .prefetch import Prefetcher
from .lane_feedback import LaneFeedback
from .scheduler import LaneState
from .stats import RunStats


class OffloadedExperts:
    capturable = False

    def __init__(self, cfg: ModelConfig, store: ExpertStore, cache: ExpertCache, planner, device: torch.device,
                 cpu_lane: CpuLane, prefetcher: Prefetcher | None = None, decode_tokens: int = 16,
                 copy_ahead: CopyAhead | None = None):
        self.cfg, self.store, self.cache, self.planner = cfg, store, cache, planner
        self.device, self.copy, self.cpu = device, CopyLane(device), cpu_lane
        self.prefetcher, self.decode_tokens, self.copy_ahead = prefetcher, decode_tokens, copy_ahead
        self.wants_guess = prefetcher is not None
        self.next_layer = dict(zip(cfg.moe_layers, cfg.moe_layers[1:]))
        self.ahead: dict[int, dict[int, int]] = {}          # layer -> {expert: staging slot} copied ahead for it
        pin = device.type == "cuda"
        self.ptrs = {layer: pointer_table(views) for layer, views in store.views.items()}
        self.host_x = PinnedBuffer(cfg.hidden_size, store.flat.dtype, pin)
        self.host_in = PinnedBuffer(cfg.hidden_size, store.flat.dtype, pin)
        self.host_out = PinnedBuffer(cfg.hidden_size, store.flat.dtype, pin)
        self.index_buf = PinnedBuffer(1, torch.int32, pin)
        self.w13_all, self.w2_all = cache.stacked()
        self.timer = LayerTimer(self.copy.cuda)
        self.phases = PhaseLog()
        self.window_ms = 0.0                   # the current layer's predicted time
        self.issued = 0.0                      # when the current layer's copies were issued (perf_counter, s)
        self.feedback = LaneFeedback(decode_tokens)
        self.acct = Accounting(cfg.moe_layers[0], cache, prefetcher, self.feedback, planner.costs)
        self.copies = ExpertCopies(self.copy, cache, store, self.acct, planner.costs.fetch_ms)
        self.graphs: dict[int, LayerGraph] = {}            # id(static MoECall) -> its captured layer graphs
        self.pool = torch.cuda.graph_pool_handle() if self.copy.cuda else None

    def set_threads(self, threads: int) -> None:
        self.cpu.set_threads(threads)

    def begin(self, stats: RunStats) -> None:
        self.acct.stats = stats
        self.timer.rewind()

    def end(self, stats: RunStats) -> None:
        self.acct.settle()
        stats.layer_meas_ms, stats.layer_pred_ms = self.timer.read()
        if self.prefetcher:
            stats.experts.prefetch_recall = self.prefetcher.recall

    def forward(self, call) -> torch.Tensor:
        """Critical path only: routing -> plan -> copies issued -> GPU work queued -> CPU experts computed here
        while copies and GPU work proceed -> combine. The layer's bookkeeping (policy, statistics, next eviction
        order) waits for the next layer's routing sync, when the host would otherwise idle."""
        layer, x, idx = call.layer, call.x, call.idx
        T, K = idx.shape
        pred = call.pred if self.prefetcher else None
        self.phases.start(layer)
        self.acct.settle()
        self.phases.mark("settled")
        xh = self.host_x.rows(T)
        xh.copy_(x, non_blocking=True)                     # rides along with the sync: the CPU lane's input
        host = (idx if pred is None else torch.cat([idx, pred], dim=1)).cpu().numpy()   # the one sync
        start = self.timer.mark()
        self.phases.mark("routed")
        flat = host[:, :K].reshape(-1)                                                    # [T*K]
        counts = np.bincount(flat, minlength=self.cfg.n_routed_experts)
        nz = np.flatnonzero(counts)
        tokens = dict(zip(nz.tolist(), counts[nz].tolist()))
        penalty = 0.0
        if pred is not None:
            c = self.planner.costs
            penalty = self.prefetcher.penalty_ms(layer, host[:, K:], self.cache.residents, c.fetch_ms,
                                                 c.cpu_ms(1) * self.feedback.cpu_scale(T))
        small = T <= self.decode_tokens              # decode: every copy in one wave, bounded by the staging room
        room = len(self.cache.staging) + self.cache.room(layer, tokens) if small else None
        ahead = self._ahead_for(layer, tokens, small)
        lanes = LaneState(self.copies.backlog_ms(), self.feedback.lag_ms(T), self.feedback.cpu_scale(T), penalty, room)
        resident = self.cache.residents(layer)
        plan = self.planner.plan(tokens, resident | ahead.keys() if ahead else resident, lanes)
        self.window_ms = plan.predicted_ms
        self.phases.mark("planned")
        job = self._start_cpu(layer, plan.cpu, flat, counts, xh, K)
        hits = [(e, ahead[e] if e in ahead else self.cache.slot_of(layer, e)) for e in plan.hits]
        self.phases.note(n_hit=len(hits), n_fetch=len(plan.fetch), n_cpu=len(plan.cpu), n_ahead=len(ahead))
        if small and len(plan.fetch) <= room:
            fetch = self.copies.admit_and_issue(layer, plan.fetch, tokens)
            self.issued = time.perf_counter()
            self.phases.mark("issued")
            out = self._decode(call, hits, fetch, plan.cpu, flat, counts, xh, host, job)
        else:
            fetch = [(e, self.copies.slot_for(layer, e, tokens)) for e in plan.fetch]
            size = max(1, (len(self.cache.staging) - self.cache.held_count) // 2)   # held: copied ahead
            waves = [fetch[i:i + size] for i in range(0, len(fetch), size)]
            for wave in waves[:2]:
                self.copies.issue(layer, wave)
            self.issued = time.perf_counter()
            out = self._grouped(call, hits, waves, plan.cpu, flat, counts, xh, host, job)
        self.timer.span(start, plan.predicted_ms)
        self.phases.mark("done")
        self.acct.defer(LayerOutcome(layer, tokens, len(plan.hits), len(fetch), len(plan.cpu),
                                     sum(1 for e in plan.hits if e in ahead)))
        return out

    def _decode(self, call, hits, fetch, cpu, flat, counts, xh, host, job) -> torch.Tensor:
        """Hits at once, fetched experts behind their copies, CPU experts here meanwhile: three fixed-shape
        pieces (replayed from CUDA graphs at decode)."""
        lay = layer_layout(flat, counts, [hits, fetch], cpu, self.cache.n_total)
        graph = self._layer_graph(call)
        self.copies.wait_landed(hits)                # prefetched hits may still be in flight
        self.phases.mark("launched")
        n_hit = lay.rows[0][1]
        graph.hits(self._pinned(lay.perm, lay.offs[0], lay.offs[1] + n_hit, n_hit))
        self.copies.wait_landed(fetch)
        ys = graph.fetched(bool(fetch))
        self.copies.read_queued(hits + fetch)
        self._prefetch_then_cpu(call, host, lay, xh, ys, job)
        return graph.post()

    def _layer_graph(self, call) -> LayerGraph:
        if not (call.static and self.copy.cuda):
            return LayerGraph(call, self.w13_all, self.w2_all, capture=False)
        if id(call) not in self.graphs:
            self.graphs[id(call)] = LayerGraph(call, self.w13_all, self.w2_all, capture=True, pool=self.pool)
        return self.graphs[id(call)]

    def _grouped(self, call, hits, waves, cpu, flat, counts, xh, host, job) -> torch.Tensor:
        """The general case (prefill, large batches): hits, then one grouped GEMM per wave of fetches."""
        x, T, K = call.x, *call.idx.shape
        lay = layer_layout(flat, counts, [hits] + waves, cpu, self.cache.n_total)
        dev = self._upload(lay)
        perm = dev[:T * K].long()                                                        # [T*K]
        offs = dev[T * K:].view(len(waves) + 1, -1)                                      # [G, S]
        tok = perm // K
        xs = x.index_select(0, tok)                                                        # [T*K, Hd]
        ys = torch.empty_like(xs)
        self.phases.mark("launched")
        self._gpu_groups(call.layer, hits, waves, lay.rows, offs, xs, ys)
        wsort = call.w.reshape(-1)[perm].unsqueeze(1)                                     # [T*K, 1]
        later = self._prefetch_then_cpu(call, host, lay, xh, ys, job, copy_ahead=T > self.decode_tokens)
        out = combine(x, tok, ys, wsort)
        self.copies.issue(*later)
        return out

    def _prefetch_then_cpu(self, call, host, lay, xh: torch.Tensor, ys: torch.Tensor, job,
                           copy_ahead: bool = False) -> tuple[int | None, list]:
        """Once the GPU side is queued: the next layer's prefetch copies (and in prefill its copies made ahead),
        then this layer's CPU experts into ys (collected from the pool if `job` started them there, else
        computed now). -> (layer, copies) still to issue, once the caller has queued the combine.

        The copy engine runs a small host-to-device copy queued on the compute stream (the CPU experts'
        results) only after the expert copies queued before it, on another stream (prefill traces, session 9):
        copies made ahead go out after the CPU results, or they would hold up this layer's combine."""
        K = call.idx.shape[1]
        pred = host[:, K:] if self.prefetcher and call.pred is not None else None
        if pred is not None:
            self._prefetch(call.layer, pred)
        later = self._copy_ahead(call.layer, pred) if copy_ahead and self.copy_ahead else (None, [])
        self.phases.mark("queued")
        if lay.cpu_segments:
            out = self._finish_cpu(job, xh.shape[0]) if job else self._cpu_experts(call.layer, lay, xh, K)
            ys[lay.cpu_start:].copy_(out, non_blocking=True)
        else:
            self.feedback.note_lag(xh.shape[0], None)
        return later

    def _ahead_for(self, layer: int, tokens: dict[int, int], small: bool) -> dict[int, int]:
        """The copies made ahead for this layer that it needs (the others' slots are released), after noting
        the PCIe lane's idle time before this prefill layer's routing."""
        ahead = self.ahead.pop(layer, {})
        if self.copy_ahead is not None and not small and layer != self.cfg.moe_layers[0]:
            self.copy_ahead.observe(1000 * (time.perf_counter() - self.copies.until))
        for e in [e for e in ahead if e not in tokens]:
            self.cache.release(ahead.pop(e))     # a later copy into the slot queues behind this one
        return ahead

    def _copy_ahead(self, layer: int, pred_host) -> tuple[int | None, list[tuple[int, int]]]:
        """Some of the next layer's uncached experts, each with a staging slot held until the next layer's GEMM
        over its hits has read it -> (next layer, [(expert, slot)]) for the caller to copy in."""
        nxt = self.next_layer.get(layer)
        n = self.copy_ahead.count() if nxt is not None else 0
        if n <= 0:
            return nxt, []
        E = self.cfg.n_routed_experts
        predicted = None
        if pred_host is not None:
            votes = np.bincount(pred_host.reshape(-1), minlength=E)
            predicted = [e for e in np.argsort(-votes, kind="stable").tolist() if votes[e]]
        chosen = CopyAhead.choose(n, E, self.cache.residents(nxt), self.cache.value_fn(nxt), predicted)
        wave = []
        for e in chosen:
            slot = self.cache.staging_slot()
            self.cache.hold(slot)
            wave.append((e, slot))
        self.ahead[nxt] = dict(wave)
        self.copy_ahead.issued = len(wave)
        self.acct.stats.experts.copied_ahead += len(wave)
        return nxt, wave

    def _pinned(self, *parts) -> torch.Tensor:
        """The parts (arrays or ints) back to back in pinned host memory, as int32."""
        sizes = [v.shape[0] if isinstance(v, np.ndarray) else 1 for v in parts]
        buf, arr = self.index_buf.vector(sum(sizes))
        pos = 0
        for v, n in zip(parts, sizes):
            arr[pos:pos + n] = v
            pos += n
        return buf

    def _upload(self, lay) -> torch.Tensor:
        buf = self._pinned(lay.perm, lay.offs.reshape(-1))
        return buf.to(self.device, non_blocking=True) if self.copy.cuda else buf.clone()

    def _gpu_groups(self, layer: int, hits, waves, rows, offs, xs, ys) -> None:
        a, b = rows[0]
        self.copies.wait_landed(hits)
        if b > a:
            ys[a:b] = grouped_ffn(xs[a:b], offs[0], self.w13_all, self.w2_all)
        self.copies.read_queued(hits)                # copies made ahead sit in staging slots
        for i, wave in enumerate(waves):
            self.copies.wait_landed(wave)
            a, b = rows[i + 1]
            ys[a:b] = grouped_ffn(xs[a:b], offs[i + 1], self.w13_all, self.w2_all)
            self.copies.read_queued(wave)
            if i + 2 < len(waves):
                self.copies.issue(layer, waves[i + 2])

    def _start_cpu(self, layer: int, cpu: list[int], flat, counts, xh: torch.Tensor, K: int):
        """Hand the layer's CPU experts to the pool now, before any copy or GPU work is queued; -> what
        `_finish_cpu` needs, or None where they do not fit the pool (then `_cpu_experts` runs them later)."""
        if not cpu or not self.cpu.experts.pool_threads:
            return None
        rows, segs = cpu_rows(flat, K, counts, cpu)
        out = self.host_out.rows(rows.shape[0])
        t0 = time.perf_counter()
        if not self.cpu.experts.start_rows(xh, rows, out, self.store.views[layer], self.ptrs[layer], segs):
            return None
        self.phases.mark("cpu_start")
        return out, t0, segs

    def _finish_cpu(self, job, T: int) -> torch.Tensor:
        out, t0, segs = job
        self.feedback.note_lag(T, 1000 * (t0 - self.issued))     # < 0: the CPU lane starts before the copies
        ms = self.cpu.experts.wait()
        self.acct.cpu_call(T, ms, [c for _, _, c in segs])
        self.phases.mark("cpu_end")
        return out

    def _cpu_experts(self, layer: int, lay, xh: torch.Tensor, K: int) -> torch.Tensor:
        """The layer's CPU experts, now, on this thread; input rows come from the host copy of x made at the sync."""
        rows = lay.perm[lay.cpu_start:] // K                                              # [n] token of each row
        n = rows.shape[0]
        out = self.host_out.rows(n)
        self.phases.mark("cpu_start")
        t0 = time.perf_counter()
        self.feedback.note_lag(xh.shape[0], 1000 * (t0 - self.issued))
        self.cpu.experts.run_rows(xh, rows, out, self.store.views[layer], self.ptrs[layer], lay.cpu_segments,
                                  self.host_in.rows(n))
        self.acct.cpu_call(xh.shape[0], 1000 * (time.perf_counter() - t0), [c for _, _, c in lay.cpu_segments])
        self.phases.mark("cpu_end")
        return out

    def _prefetch(self, layer: int, pred_host) -> None:
        nxt = self.prefetcher.next[layer]
        predicted = set(pred_host.reshape(-1).tolist())
        c = self.planner.costs          # only what the PCIe lane can move before the next layer routes
        room = int((self.window_ms + c.layer_overhead_ms - self.copies.backlog_ms()) / c.fetch_ms)
        chosen = self.prefetcher.choose(pred_host, self.cache.residents(nxt))[:max(0, room)]
        wave = []
        for e in chosen:
            slot = self.cache.admit(nxt, e, predicted)
            if slot is None:
                break
            wave.append((e, slot))
        self.copies.issue(nxt, wave)
        self.cache.prepare(nxt)
        self.acct.prefetch(nxt, predicted, {e for e, _ in wave})

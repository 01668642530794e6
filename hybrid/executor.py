"""Carries out per-layer plans: GPU hits, fetches on the copy stream, CPU experts on the CPU lane, one combine.

`OffloadedExperts` is the ExpertBackend of modes fetch, cpu and hybrid; the planner decides, this executes."""
from __future__ import annotations

import time

import numpy as np
import torch

from .config import ModelConfig
from .expert_cache import ExpertCache
from .expert_store import ExpertStore
from .experts import expert_ffn
from .lanes import CopyLane, CpuLane, PinnedBuffer
from .prefetch import GatePrefetcher
from .stats import RunStats


class OffloadedExperts:
    def __init__(self, cfg: ModelConfig, store: ExpertStore, cache: ExpertCache, planner, device: torch.device,
                 cpu_lane: CpuLane, prefetcher: GatePrefetcher | None = None):
        self.cfg, self.store, self.cache, self.planner = cfg, store, cache, planner
        self.device, self.copy, self.cpu = device, CopyLane(device), cpu_lane
        self.prefetcher = prefetcher
        pin = device.type == "cuda"
        self.host_in = PinnedBuffer(cfg.hidden_size, store.flat.dtype, pin)
        self.host_out = PinnedBuffer(cfg.hidden_size, store.flat.dtype, pin)
        self.stats = RunStats("", 0, 0)
        self.timings: list = []
        self.prefetched: dict[int, set[int]] = {}
        self.predicted: dict[int, set[int]] = {}

    def attach(self, model) -> None:
        model.predict_next = self.prefetcher is not None

    def begin(self, stats: RunStats) -> None:
        self.stats, self.timings = stats, []

    def end(self, stats: RunStats) -> None:
        if self.copy.cuda:
            torch.cuda.synchronize()
            meas = [a.elapsed_time(b) for a, b, _ in self.timings]
        else:
            meas = [1000 * (b - a) for a, b, _ in self.timings]
        stats.layer_meas_ms = meas
        stats.layer_pred_ms = [p for _, _, p in self.timings]
        if self.prefetcher:
            stats.experts.prefetch_recall = self.prefetcher.recall

    def _now(self):
        return self.copy.timing_event() if self.copy.cuda else time.perf_counter()

    def _fetch(self, layer: int, e: int, protected: set[int]) -> int:
        slot = self.cache.admit(layer, e, protected)
        after = None
        if slot is None:
            slot = self.cache.staging_slot()
            after = self.cache.free[slot]
        self.cache.ready[slot] = self.copy.copy(self.cache.slots[slot], self.store.buffer(layer, e), after)
        self.stats.experts.fetched += 1
        self.stats.experts.fetched_bytes += self.store.numel * self.store.flat.element_size()
        return slot

    def _cpu_work(self, layer: int, ready, segments: list[tuple[int, int, int]], n: int) -> torch.Tensor:
        if ready is not None:
            ready.synchronize()
        t0 = time.perf_counter()
        xin, out = self.host_in.rows(n), self.host_out.rows(n)
        for e, a, c in segments:
            w13, w2 = self.store.weights(layer, e)
            out[a:a + c] = expert_ffn(xin[a:a + c], w13, w2)
        self.stats.experts.cpu_busy_s += time.perf_counter() - t0
        return out

    capturable = False

    def forward(self, call) -> torch.Tensor:
        layer, x, idx, w, pred = call.layer, call.x, call.idx, call.w, call.pred
        T, K = idx.shape
        pred = pred if self.prefetcher else None
        host = (idx if pred is None else torch.cat([idx, pred], dim=1)).cpu().numpy()   # the one sync
        start = self._now()
        if layer == self.cfg.moe_layers[0]:
            self.cache.tick()
        flat = host[:, :K].reshape(-1)                                                    # [T*K]
        counts = np.bincount(flat, minlength=self.cfg.n_routed_experts)
        tokens = {int(e): int(counts[e]) for e in np.nonzero(counts)[0]}
        self._score_prefetch(layer, set(tokens))
        self.cache.touch(layer, tokens)
        plan = self.planner.plan(tokens, self.cache.cached(layer))
        self.stats.experts.count(layer, len(plan.hits), len(plan.fetch) + len(plan.cpu))
        self.stats.experts.cpu_experts += len(plan.cpu)
        order = plan.hits + plan.fetch + plan.cpu
        rank = np.zeros(self.cfg.n_routed_experts, dtype=np.int64)
        rank[order] = np.arange(len(order))
        perm_h = np.argsort(rank[flat], kind="stable")
        offs = np.concatenate([[0], np.cumsum([tokens[e] for e in order])])
        seg = {e: (int(offs[i]), int(offs[i + 1])) for i, e in enumerate(order)}
        perm = torch.from_numpy(perm_h).to(self.device)                                  # [T*K]
        tok = perm // K
        xs = x.index_select(0, tok)                                                        # [T*K, Hd]
        ys = torch.empty_like(xs)
        fut = self._start_cpu(layer, plan.cpu, seg, xs)
        ys = self._gpu_experts(layer, plan, seg, xs, ys, set(tokens))
        if pred is not None:
            self._prefetch(layer, host[:, K:])
        if fut is not None:
            a = seg[plan.cpu[0]][0]
            ys[a:].copy_(fut.result(), non_blocking=True)
        out = torch.zeros_like(x).index_add_(0, tok, (ys * w.reshape(-1)[perm, None]).to(x.dtype))
        self.timings.append((start, self._now(), plan.predicted_ms))
        return out

    def _start_cpu(self, layer: int, cpu: list[int], seg: dict, xs: torch.Tensor):
        if not cpu:
            return None
        a = seg[cpu[0]][0]
        n = xs.shape[0] - a
        self.host_in.rows(n).copy_(xs[a:], non_blocking=True)
        self.host_out.rows(n)
        segments = [(e, seg[e][0] - a, seg[e][1] - seg[e][0]) for e in cpu]
        return self.cpu.submit(self._cpu_work, layer, self.copy.event(), segments, n)

    def _gpu_experts(self, layer: int, plan, seg: dict, xs, ys, needed: set[int]):
        cache, depth = self.cache, len(self.cache.staging)
        slots = {e: cache.lookup(layer, e) for e in plan.hits}
        pending = list(plan.fetch)
        for e in pending[:depth]:
            slots[e] = self._fetch(layer, e, needed)
        for i, e in enumerate(plan.hits + pending):
            s = slots[e]
            self.copy.wait(cache.ready[s])
            a, b = seg[e]
            w13, w2 = cache.weights(s)
            ys[a:b] = expert_ffn(xs[a:b], w13, w2)
            if s >= cache.n_slots:
                cache.free[s] = self.copy.event()
            j = i - len(plan.hits) + depth
            if 0 <= i - len(plan.hits) and j < len(pending):
                slots[pending[j]] = self._fetch(layer, pending[j], needed)
        return ys

    def _prefetch(self, layer: int, pred_host) -> None:
        nxt = self.prefetcher.next[layer]
        cached = self.cache.cached(nxt)
        self.predicted[nxt] = set(pred_host.reshape(-1).tolist())
        chosen = self.prefetcher.choose(pred_host, cached)
        protected = self.predicted[nxt]
        done = set()
        for e in chosen:
            slot = self.cache.admit(nxt, e, protected)
            if slot is None:
                break
            self.cache.ready[slot] = self.copy.copy(self.cache.slots[slot], self.store.buffer(nxt, e))
            done.add(e)
        self.prefetched[nxt] = done
        self.stats.experts.prefetched += len(done)
        self.stats.experts.fetched += len(done)
        self.stats.experts.fetched_bytes += len(done) * self.store.numel * self.store.flat.element_size()

    def _score_prefetch(self, layer: int, needed: set[int]) -> None:
        if not self.prefetcher:
            return
        if layer in self.predicted:
            self.prefetcher.score(self.predicted.pop(layer), needed)
        self.stats.experts.prefetch_used += len(self.prefetched.pop(layer, set()) & needed)

"""Per-layer plans for the uncached experts: fetch over PCIe, or run on the CPU. Pure Python (no torch).

A planner sees how many tokens each needed expert has and which are cached, and returns a `LayerPlan`.
The hybrid planner minimises the layer's makespan: the PCIe lane, the CPU lane and GPU compute run at once."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

from cost_model.costs import CostModel

EXACT_LIMIT = 48       # candidate splits searched exhaustively; above that, the O(misses) prefix scan
STEP_MS = 0.05         # lane times are rounded to this for memoising plans


@dataclass
class LayerPlan:
    """What a layer does with each expert it needs, how its copies go out, and what it copies for the next layer.
    The planner fills in the layer's own part at the routing sync; next_layer.NextLayerCopies the next layer's, once
    the layer's own copies and GPU work are queued (choosing earlier would delay its CPU lane): the prefetch
    candidates, then, after the prefetch is issued, the copies made ahead (which skip what it admitted). The executor
    admits slots and issues copies as the plan says; of `prefetch` it copies as many as the PCIe lane can move before
    the next routing, by the backlog it measures then."""
    hits: list[int] = field(default_factory=list)     # cached: computed on the GPU
    fetch: list[int] = field(default_factory=list)    # copied to the GPU, then computed there
    cpu: list[int] = field(default_factory=list)      # computed on the CPU with the activations shipped
    predicted_ms: float = 0.0
    waves: list[list[int]] = field(default_factory=list)   # the fetches in the order of their GEMMs
    one_wave: bool = False            # decode's fixed-shape path: all copies in one wave, one GEMM behind them
    prefetch: list[int] = field(default_factory=list)      # the next layer's guessed, uncached experts, best first
    ahead: list[int] = field(default_factory=list)         # prefill: the next layer's experts to copy ahead

    def with_waves(self, lanes: "LaneState") -> "LayerPlan":
        """One wave where the fetches fit the decode path's room (lanes.max_fetch), else waves of
        lanes.wave_size (the free staging room, halved: one wave lands while the previous one computes)."""
        self.one_wave = lanes.max_fetch is not None and len(self.fetch) <= lanes.max_fetch
        size = len(self.fetch) if self.one_wave else lanes.wave_size
        self.waves = [self.fetch[i:i + size] for i in range(0, len(self.fetch), max(1, size))]
        return self


@dataclass(frozen=True)
class LaneState:
    """What the executor knows of its lanes when a layer's routing arrives."""
    backlog_ms: float = 0.0         # copies queued earlier (e.g. prefetches) still ahead on the PCIe lane
    cpu_lag_ms: float = 0.0         # from issuing the layer's copies to starting its CPU experts (< 0: CPU first)
    cpu_scale: float = 1.0          # measured / modelled CPU lane time so far on this machine (online correction)
    fetch_penalty_ms: float = 0.0   # what one copy's PCIe time is worth elsewhere (a prefetch for the next
                                    # layer): charged per fetch when choosing, not in predicted_ms
    max_fetch: int | None = None    # copies the executor's fast path takes (planners with a CPU lane keep to it)
    wave_size: int = 1 << 30        # copies per wave where they do not fit the fast path
    bytes_scale: float = 1.0        # the layer's expert bytes / the calibrated format's (a GGUF layer's own, smaller
                                    # down): copies and CPU experts cost that much of the calibrated time

    def key(self, misses: int | None = None) -> tuple:
        """What a plan depends on, rounded for the memo; with `misses`, a room past them counts as them (it cannot
        change the plan; batch 1's room changes at every eviction)."""
        r = lambda ms: round(ms / STEP_MS) * STEP_MS  # noqa: E731
        room = self.max_fetch if self.max_fetch is None or misses is None else min(self.max_fetch, misses)
        return (r(self.backlog_ms), r(self.cpu_lag_ms), round(self.cpu_scale / 0.05) * 0.05,
                r(self.fetch_penalty_ms), room, round(self.bytes_scale, 3))


def makespan(costs: CostModel, tokens: dict[int, int], hits: list[int], fetch: list[int], cpu: list[int],
             backlog_ms: float = 0.0, cpu_lag_ms: float = 0.0, cpu_scale: float = 1.0,
             bytes_scale: float = 1.0) -> float:
    """Predicted layer time: the slowest of the GPU lane (fed by the PCIe lane, which first drains `backlog_ms`
    of copies queued earlier) and the CPU lane (which starts `cpu_lag_ms` after the copies are issued and runs
    at `cpu_scale` times the calibrated cost)."""
    gpu = sum(costs.gpu_ms(tokens[e]) for e in hits) + sum(costs.gpu_ms(tokens[e]) for e in fetch)
    if fetch:
        pcie = backlog_ms + costs.pcie_ms(len(fetch), bytes_scale)
        gpu = max(gpu, pcie + min(costs.gpu_ms(tokens[e]) for e in fetch))
    lane_cpu = 0.0
    if cpu:
        lane_cpu = costs.cpu_lane_ms(costs.xfer_ms(sum(tokens[e] for e in cpu)),
                                     sum(costs.cpu_ms(tokens[e]) for e in cpu), cpu_lag_ms, cpu_scale * bytes_scale)
    return costs.layer_overhead_ms + max(gpu, lane_cpu)


class FetchPlanner:
    """mixtral-offloading: every miss is copied in."""

    def __init__(self, costs: CostModel | None = None):
        self.costs = costs or CostModel.defaults()
        self.curves: dict[tuple[str, float], float] = {}        # (curve, x) -> ms: lookups are the hot path

    def _ms(self, curve: str, x: float) -> float:
        key = (curve, x)
        if key not in self.curves:
            self.curves[key] = getattr(self.costs, curve)(x)
        return self.curves[key]

    def all_hits(self, tokens: dict[int, int]) -> LayerPlan:
        """Every needed expert is cached: one GPU group, nothing to choose (decode's fast path)."""
        t = self.costs.layer_overhead_ms + sum(self._ms("gpu_ms", n) for n in tokens.values())
        return LayerPlan(list(tokens), [], [], t, waves=[], one_wave=True)

    def plan(self, tokens: dict[int, int], cached: set[int], lanes: LaneState = LaneState()) -> LayerPlan:
        """tokens: expert -> rows routed to it; cached: experts resident on the GPU."""
        hits = [e for e in tokens if e in cached]
        fetch = [e for e in tokens if e not in cached]
        return LayerPlan(hits, fetch, [], makespan(self.costs, tokens, hits, fetch, [], lanes.backlog_ms,
                                                   bytes_scale=lanes.bytes_scale)).with_waves(lanes)


class CpuPlanner(FetchPlanner):
    """Fiddler without the scheduler: every miss runs on the CPU."""

    def plan(self, tokens: dict[int, int], cached: set[int], lanes: LaneState = LaneState()) -> LayerPlan:
        hits = [e for e in tokens if e in cached]
        cpu = [e for e in tokens if e not in cached]
        return LayerPlan(hits, [], cpu, makespan(self.costs, tokens, hits, [], cpu, 0.0, lanes.cpu_lag_ms,
                                                 lanes.cpu_scale, lanes.bytes_scale)).with_waves(lanes)


class MakespanPlanner(FetchPlanner):
    """Chooses, per miss, fetch or CPU to minimise the layer's makespan under the cost model.

    With a fetch penalty p it minimises makespan + p x fetches: with prefetch on, a copy made now for this
    layer is a copy not made ahead for the next one, whose CPU lane it would have spared. `max_fetch` caps the
    copies (the executor's staging room). Misses with equal token counts are interchangeable, so a candidate is
    how many of each count go to the CPU. Small spaces are searched exhaustively (exact); larger ones scan the
    CPU taking the k smallest misses, k = 0..all, in O(misses). Decisions depend only on the misses' token counts
    and the hits' GPU time, so they are memoised (batch 1 repeats a few keys; batch 16 hardly repeats one, so the
    memo is emptied when it grows past MEMO_LIMIT). Costs per token count come from tables: this runs at every
    planned layer's routing sync, on the critical path."""

    MEMO_LIMIT = 4096

    def __init__(self, costs: CostModel | None = None):
        super().__init__(costs)
        self.memo: dict[tuple, tuple[tuple[int, ...], float]] = {}
        self.tables: dict[str, list[float]] = {}

    def _table(self, curve: str, upto: int) -> list[float]:
        """[curve(0), curve(1), ..., curve(upto)] (token counts -> ms), grown as larger counts come."""
        t = self.tables.setdefault(curve, [0.0])
        if len(t) <= upto:
            f = getattr(self.costs, curve)
            t.extend(f(n) for n in range(len(t), upto + 1))
        return t

    def plan(self, tokens: dict[int, int], cached: set[int], lanes: LaneState = LaneState()) -> LayerPlan:
        hits, groups = [], {}
        for e, n in tokens.items():
            if e in cached:
                hits.append(e)
            else:
                groups.setdefault(n, []).append(e)
        groups = dict(sorted(groups.items()))
        gpu = self._table("gpu_ms", max(tokens.values(), default=0))
        gpu_hits = sum(gpu[tokens[e]] for e in hits)
        key = (gpu_hits, tuple((n, len(g)) for n, g in groups.items()), *lanes.key(len(tokens) - len(hits)))
        if key not in self.memo:
            if len(self.memo) >= self.MEMO_LIMIT:
                self.memo.clear()
            self.memo[key] = self._search(*key)
        picks, t = self.memo[key]
        cpu = [e for g, m in zip(groups.values(), picks) for e in g[:m]]
        fetch = [e for g, m in zip(groups.values(), picks) for e in g[m:]]
        return LayerPlan(hits, fetch, cpu, t).with_waves(lanes)

    def _search(self, gpu_hits, groups, backlog, lag, scale, penalty, max_fetch,
                bytes_scale) -> tuple[tuple[int, ...], float]:
        """Best count per token-count group to run on the CPU, and its predicted makespan."""
        sizes = [s for _, s in groups]
        misses = sum(sizes)
        least_cpu = 0 if max_fetch is None else max(0, misses - max_fetch)
        space = 1
        for s in sizes:
            space *= s + 1
        if space > EXACT_LIMIT:
            return self._scan(gpu_hits, groups, backlog, lag, scale, penalty, least_cpu, bytes_scale)
        c, scale = self.costs, scale * bytes_scale
        ns = [n for n, _ in groups]
        unit_cpu, unit_gpu = [c.cpu_ms(n) for n in ns], [c.gpu_ms(n) for n in ns]

        def makespan_of(picks) -> float:
            nf = misses - sum(picks)
            gpu = gpu_hits + sum(u * (s - m) for u, s, m in zip(unit_gpu, sizes, picks))
            if nf:
                first = min(u for u, s, m in zip(unit_gpu, sizes, picks) if m < s)
                gpu = max(gpu, backlog + c.pcie_ms(nf, bytes_scale) + first)
            lane = 0.0
            if any(picks):
                lane = c.cpu_lane_ms(c.xfer_ms(sum(n * m for n, m in zip(ns, picks))),
                                     sum(u * m for u, m in zip(unit_cpu, picks)), lag, scale)
            return c.layer_overhead_ms + max(gpu, lane)

        candidates = (p for p in product(*(range(s + 1) for s in sizes)) if sum(p) >= least_cpu)
        scored = ((tuple(p), makespan_of(p)) for p in candidates)
        return min(scored, key=lambda pt: pt[1] + penalty * (misses - sum(pt[0])))

    def _scan(self, gpu_hits, groups, backlog, lag, scale, penalty, least_cpu,
              bytes_scale) -> tuple[tuple[int, ...], float]:
        """The CPU takes the k misses with the fewest tokens, k = least_cpu..all, each costed in O(1)."""
        c, scale = self.costs, scale * bytes_scale
        ns = [n for n, s in groups for _ in range(s)]                     # misses, fewest tokens first
        gpu_t, cpu_t = self._table("gpu_ms", ns[-1]), self._table("cpu_ms", ns[-1])
        gpu_of, cpu_of = [gpu_t[n] for n in ns], [cpu_t[n] for n in ns]
        gpu_all = gpu_hits + sum(gpu_of)
        fixed, over, m = lag + scale * c.cpu_dispatch_ms, c.layer_overhead_ms, len(ns)
        best, best_k = float("inf"), 0
        rows = cpu_sum = gpu_moved = 0.0
        for k in range(m + 1):
            if k:
                rows, cpu_sum, gpu_moved = rows + ns[k - 1], cpu_sum + cpu_of[k - 1], gpu_moved + gpu_of[k - 1]
            if k < least_cpu:
                continue
            nf = m - k
            gpu = gpu_all - gpu_moved
            if nf:
                gpu = max(gpu, backlog + c.pcie_ms(nf, bytes_scale) + gpu_of[k])
            lane = fixed + scale * (self._ms("xfer_ms", rows) + cpu_sum) if k else 0.0
            t = over + max(gpu, lane)
            if t + penalty * nf < best + penalty * (m - best_k) or k == least_cpu:
                best, best_k = t, k
        return self._prefix([s for _, s in groups], best_k), best

    @staticmethod
    def _prefix(sizes: list[int], m: int) -> tuple[int, ...]:
        """The m misses with the fewest tokens, as counts per group."""
        out = []
        for s in sizes:
            out.append(min(s, m))
            m -= out[-1]
        return tuple(out)


PLANNERS = {"fetch": FetchPlanner, "cpu": CpuPlanner, "hybrid": MakespanPlanner}

"""Per-layer plans for the uncached experts: fetch over PCIe, or run on the CPU. Pure Python (no torch).

A planner sees how many tokens each needed expert has and which are cached, and returns a `LayerPlan`.
The hybrid planner minimises the layer's makespan: the PCIe lane, the CPU lane and GPU compute run at once."""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

from cost_model.costs import CostModel

EXACT_LIMIT = 4096     # largest number of candidate splits evaluated exhaustively


@dataclass
class LayerPlan:
    hits: list[int] = field(default_factory=list)     # cached: computed on the GPU
    fetch: list[int] = field(default_factory=list)    # copied to the GPU, then computed there
    cpu: list[int] = field(default_factory=list)      # computed on the CPU with the activations shipped
    predicted_ms: float = 0.0


def makespan(costs: CostModel, tokens: dict[int, int], hits: list[int], fetch: list[int], cpu: list[int]) -> float:
    """Predicted layer time: the slowest of the GPU lane (fed by the PCIe lane) and the CPU lane."""
    gpu = sum(costs.gpu_ms(tokens[e]) for e in hits) + sum(costs.gpu_ms(tokens[e]) for e in fetch)
    if fetch:
        pcie = len(fetch) * costs.fetch_ms
        gpu = max(gpu, pcie + min(costs.gpu_ms(tokens[e]) for e in fetch))
    lane_cpu = 0.0
    if cpu:
        lane_cpu = costs.cpu_dispatch_ms + costs.xfer_ms(sum(tokens[e] for e in cpu)) + \
            sum(costs.cpu_ms(tokens[e]) for e in cpu)
    return costs.layer_overhead_ms + max(gpu, lane_cpu)


class FetchPlanner:
    """mixtral-offloading: every miss is copied in."""

    def __init__(self, costs: CostModel | None = None):
        self.costs = costs or CostModel.defaults()

    def plan(self, tokens: dict[int, int], cached: set[int]) -> LayerPlan:
        hits = [e for e in tokens if e in cached]
        fetch = [e for e in tokens if e not in cached]
        return LayerPlan(hits, fetch, [], makespan(self.costs, tokens, hits, fetch, []))


class CpuPlanner(FetchPlanner):
    """Fiddler without the scheduler: every miss runs on the CPU."""

    def plan(self, tokens: dict[int, int], cached: set[int]) -> LayerPlan:
        hits = [e for e in tokens if e in cached]
        cpu = [e for e in tokens if e not in cached]
        return LayerPlan(hits, [], cpu, makespan(self.costs, tokens, hits, [], cpu))


class MakespanPlanner(FetchPlanner):
    """Chooses, per miss, fetch or CPU to minimise the layer's makespan under the cost model.

    Misses with equal token counts are interchangeable, so the search is over how many of each count go to
    the CPU: exact while that space is small, else the best split of misses sorted by token count (the CPU
    takes a prefix of the smallest). Decisions depend only on the token counts, so they are memoised."""

    def __init__(self, costs: CostModel | None = None):
        super().__init__(costs)
        self.memo: dict[tuple, tuple[tuple[int, ...], float]] = {}

    def plan(self, tokens: dict[int, int], cached: set[int]) -> LayerPlan:
        hits = [e for e in tokens if e in cached]
        misses = sorted((e for e in tokens if e not in cached), key=lambda e: tokens[e])
        groups: dict[int, list[int]] = {}
        for e in misses:
            groups.setdefault(tokens[e], []).append(e)
        key = (tuple(sorted(tokens[e] for e in hits)), tuple((n, len(g)) for n, g in groups.items()))
        if key not in self.memo:
            self.memo[key] = self._search(tokens, hits, misses, groups)
        picks, t = self.memo[key]
        cpu = [e for g, m in zip(groups.values(), picks) for e in g[:m]]
        chosen = set(cpu)
        return LayerPlan(hits, [e for e in misses if e not in chosen], cpu, t)

    def _search(self, tokens, hits, misses, groups) -> tuple[tuple[int, ...], float]:
        """Best number of misses of each token count to send to the CPU, and the predicted makespan."""
        sizes = [len(g) for g in groups.values()]
        space = 1
        for s in sizes:
            space *= s + 1
        if space <= EXACT_LIMIT:
            candidates = product(*(range(s + 1) for s in sizes))
        else:
            candidates = (self._prefix(sizes, m) for m in range(len(misses) + 1))
        best: tuple[tuple[int, ...], float] | None = None
        for picks in candidates:
            cpu = [e for g, m in zip(groups.values(), picks) for e in g[:m]]
            chosen = set(cpu)
            t = makespan(self.costs, tokens, hits, [e for e in misses if e not in chosen], cpu)
            if best is None or t < best[1] - 1e-12:
                best = (tuple(picks), t)
        return best

    @staticmethod
    def _prefix(sizes: list[int], m: int) -> tuple[int, ...]:
        """The first m misses in token order, as counts per group."""
        out = []
        for s in sizes:
            out.append(min(s, m))
            m -= out[-1]
        return tuple(out)


PLANNERS = {"fetch": FetchPlanner, "cpu": CpuPlanner, "hybrid": MakespanPlanner}

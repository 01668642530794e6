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
        lane_cpu = costs.xfer_ms(sum(tokens[e] for e in cpu)) + sum(costs.cpu_ms(tokens[e]) for e in cpu)
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
    the CPU (the cheapest-to-run-on-CPU ones first): exact while that space is small, else the best split
    of misses sorted by token count (CPU takes a prefix of the smallest)."""

    def plan(self, tokens: dict[int, int], cached: set[int]) -> LayerPlan:
        hits = [e for e in tokens if e in cached]
        misses = sorted((e for e in tokens if e not in cached), key=lambda e: tokens[e])
        groups: dict[int, list[int]] = {}
        for e in misses:
            groups.setdefault(tokens[e], []).append(e)
        sizes = [len(g) for g in groups.values()]
        space = 1
        for s in sizes:
            space *= s + 1
        if space <= EXACT_LIMIT:
            splits = (sum((g[:m] for g, m in zip(groups.values(), ms)), []) for ms in product(*(range(s + 1) for s in sizes)))
        else:
            splits = (misses[:m] for m in range(len(misses) + 1))
        best = None
        for cpu in splits:
            chosen = set(cpu)
            fetch = [e for e in misses if e not in chosen]
            t = makespan(self.costs, tokens, hits, fetch, cpu)
            if best is None or t < best.predicted_ms - 1e-12:
                best = LayerPlan(hits, fetch, list(cpu), t)
        return best or LayerPlan(hits, [], [], makespan(self.costs, tokens, hits, [], []))


PLANNERS = {"fetch": FetchPlanner, "cpu": CpuPlanner, "hybrid": MakespanPlanner}

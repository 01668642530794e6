"""Prefetch policy: which of the predicted next-layer experts to copy ahead, and how good the guesses were.

The prediction itself (layer L+1's router applied to layer L's MoE input) is computed inside the model's
graph-captured step (`DeepseekV2.predict_next`), so it costs no extra host synchronisation."""
from __future__ import annotations

from ..model.config import ModelConfig


class Prefetcher:
    """Chooses which predicted experts of layer L+1 to copy during layer L, within a per-layer budget."""

    def __init__(self, cfg: ModelConfig, budget: int | None = None, lookahead: bool = True):
        self.cfg, self.lookahead = cfg, lookahead
        layers = cfg.moe_layers
        self.next = {a: b for a, b in zip(layers, layers[1:])}
        self.budget = budget if budget is not None else cfg.num_experts_per_tok   # experts per layer
        self.needed = self.predicted = self.hit = 0

    def choose(self, pred_host, cached: set[int]) -> list[int]:
        """The uncached predicted experts, most-voted first, within the per-layer budget."""
        votes: dict[int, int] = {}
        for e in pred_host.reshape(-1).tolist():
            votes[e] = votes.get(e, 0) + 1
        order = sorted((e for e in votes if e not in cached), key=lambda e: -votes[e])
        return order[:self.budget]

    def penalty_ms(self, layer: int, pred_host, residents, fetch_ms: float, cpu_ms: float) -> float:
        """What one on-demand copy at `layer` costs beyond it: its PCIe slot could instead prefetch a predicted
        expert of the next layer, which (at the recall so far) would take one miss off the next layer, worth about
        f*c/(f+c) there when its two lanes share the misses (f per copy, c per CPU expert). Zero without lookahead,
        at the last layer, or when every predicted expert is already resident (`residents(layer)`: cached set)."""
        nxt = self.next.get(layer)
        if not self.lookahead or nxt is None or set(pred_host.reshape(-1).tolist()) <= residents(nxt):
            return 0.0
        return self.expected_recall() * fetch_ms * cpu_ms / (fetch_ms + cpu_ms)

    def score(self, predicted: set[int], needed: set[int]) -> None:
        self.needed += len(needed)
        self.predicted += len(predicted)
        self.hit += len(predicted & needed)

    def expected_recall(self, prior: float = 0.8, after: int = 100) -> float:
        """The recall so far once `after` needed experts were scored; `prior` until then."""
        return self.recall if self.needed >= after else prior

    @property
    def recall(self) -> float:
        return self.hit / self.needed if self.needed else 0.0

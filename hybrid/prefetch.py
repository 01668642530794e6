"""Predict the next MoE layer's experts from the current hidden state and copy them ahead of need."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import ModelConfig


class GatePrefetcher:
    """Applies layer L+1's router to layer L's MoE input: its top-k is the guess for layer L+1."""

    def __init__(self, cfg: ModelConfig, budget: int | None = None):
        self.cfg = cfg
        layers = cfg.moe_layers
        self.next = {a: b for a, b in zip(layers, layers[1:])}
        self.budget = budget if budget is not None else cfg.num_experts_per_tok   # experts per layer
        self.routers: dict[int, torch.Tensor] = {}
        self.needed = self.predicted = self.hit = 0

    def attach(self, routers: dict[int, torch.Tensor]) -> None:
        self.routers = routers

    def predict(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """x [T, Hd] -> predicted expert ids [T, K] for the next MoE layer (on device), None at the last."""
        nxt = self.next.get(layer)
        if nxt is None or nxt not in self.routers:
            return None
        scores = F.linear(x.float(), self.routers[nxt]).softmax(dim=-1)              # [T, E]
        return scores.topk(self.cfg.num_experts_per_tok, dim=-1).indices

    def choose(self, pred_host, cached: set[int]) -> list[int]:
        """The uncached predicted experts, most-voted first, within the per-layer budget."""
        votes: dict[int, int] = {}
        for e in pred_host.reshape(-1).tolist():
            votes[e] = votes.get(e, 0) + 1
        order = sorted((e for e in votes if e not in cached), key=lambda e: -votes[e])
        return order[:self.budget]

    def score(self, predicted: set[int], needed: set[int]) -> None:
        self.needed += len(needed)
        self.predicted += len(predicted)
        self.hit += len(predicted & needed)

    @property
    def recall(self) -> float:
        return self.hit / self.needed if self.needed else 0.0

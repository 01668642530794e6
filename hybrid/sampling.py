"""Next-token selection: greedy, or temperature with nucleus (top-p) sampling from a seeded generator."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_on_eos: bool = True


class Sampler:
    def __init__(self, params: SamplingParams, device):
        self.p = params
        self.gen = None
        if params.temperature > 0:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(params.seed if params.seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] float32 -> token ids [B]."""
        if self.p.temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / self.p.temperature, dim=-1)
        if self.p.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < self.p.top_p                 # always keeps the top token
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        return torch.multinomial(probs, 1, generator=self.gen).squeeze(-1)

"""Next-token selection: greedy, or temperature with nucleus (top-p) sampling from a seeded generator."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..model.config import ConfigError


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_on_eos: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer of at least 1, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p!r}")


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

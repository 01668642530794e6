"""MLA's compressed KV cache: per layer and token, the normalised latent and the roped key part."""
from __future__ import annotations

import torch

from .config import ModelConfig


class LatentCache:
    """MLA's compressed cache: per layer and token, the normalised latent [C] and the roped key part [R]."""

    def __init__(self, cfg: ModelConfig, batch: int, length: int, dtype: torch.dtype, device):
        L = cfg.num_hidden_layers
        self.c = torch.zeros(L, batch, length, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(L, batch, length, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    @property
    def capacity(self) -> int:
        return self.c.shape[2]

    def batch(self, b: int) -> "LatentCache":
        """A view on the first b sequences (same storage, so CUDA graphs captured on it stay valid)."""
        view = object.__new__(LatentCache)
        view.c, view.pe = self.c[:, :b], self.pe[:, :b]
        return view

    def rows(self, a: int, b: int) -> "LatentCache":
        """A view on sequences a..b-1."""
        view = object.__new__(LatentCache)
        view.c, view.pe = self.c[:, a:b], self.pe[:, a:b]
        return view

    def copy_row(self, src: int, dst: int) -> None:
        self.c[:, dst].copy_(self.c[:, src])
        self.pe[:, dst].copy_(self.pe[:, src])

    def shift(self, rows: int, by: int, length: int) -> None:
        """Move the first `rows` sequences' slots [max(0, -by), length) by `by` slots (left if negative); a layer at
        a time, so the temporary copy is one layer's."""
        lo = max(0, -by)
        for t in (self.c, self.pe):
            for layer in t:
                layer[:rows, lo + by:length + by] = layer[:rows, lo:length].clone()

    @staticmethod
    def nbytes(cfg: ModelConfig, batch: int, length: int, itemsize: int) -> int:
        return cfg.num_hidden_layers * batch * length * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * itemsize

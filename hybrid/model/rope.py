"""Rotary position embedding with DeepSeek's YaRN frequency correction."""
from __future__ import annotations

import math

import torch

from .config import ModelConfig


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def yarn_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [R/2] and the cos/sin scale, as the original DeepSeek-V2 code computes them."""
    dim, base = cfg.qk_rope_head_dim, float(cfg.rope_theta)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = cfg.rope_scaling or {}
    if rs.get("type", rs.get("rope_type", "default")) != "yarn":
        return 1.0 / pos_freqs, 1.0
    factor = rs["factor"]
    orig = rs["original_max_position_embeddings"]
    fast, slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def corr_dim(rot: float) -> float:
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = max(math.floor(corr_dim(fast)), 0), min(math.ceil(corr_dim(slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    m, m_all = rs.get("mscale", 1.0), rs.get("mscale_all_dim", 0.0)
    scale = _mscale(factor, m) / _mscale(factor, m_all) if (m and m_all) else _mscale(factor)
    return inv_freq, float(scale)


class Rope:
    """Rotations for given positions, applied to adjacent (even, odd) pairs as one complex multiply."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str):
        inv_freq, self.scale = yarn_inv_freq(cfg)
        self.inv_freq = inv_freq.to(device)

    def rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [B, T] -> scale * e^(i pos freq) [B, T, R/2] complex64."""
        freqs = positions[..., None].float() * self.inv_freq                             # [B, T, R/2]
        return torch.polar(torch.full_like(freqs, self.scale), freqs)

    @staticmethod
    def apply(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """x [B, T, ..., R] with pairs (2i, 2i+1) taken as complex numbers, rotated by rot [B, T, R/2]: the pairs
        stay where they are (q and k are rotated alike, so their dot products are the original's)."""
        while rot.dim() < x.dim():
            rot = rot.unsqueeze(-2)
        xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))                     # [..., R/2]
        return torch.view_as_real(xc * rot).flatten(-2).to(x.dtype)

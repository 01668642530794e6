"""Builds the expert backend for a run's mode: this is where the offloading runtimes plug into the model."""
from __future__ import annotations

import torch

from .checkpoint import Checkpoint
from .config import ModelConfig, RunConfig
from .experts import ResidentExperts

MODES = ("gpu",)


def build_backend(cfg: ModelConfig, ckpt: Checkpoint, run: RunConfig, device: torch.device,
                  dtype: torch.dtype, progress: bool = True):
    if run.mode == "gpu":
        return ResidentExperts(cfg, ckpt, device, dtype, progress)
    raise ValueError(f"unknown mode {run.mode!r}: choose one of {', '.join(MODES)}")

"""Which mode a run takes and where its weights live, before anything is loaded: mode auto all resident where
every expert fits the budget, else hybrid; all resident with a budget, a GGUF's non-expert weights in its blocks
where their copies in the compute dtype would not leave room for the experts."""
from __future__ import annotations

from dataclasses import replace

import torch

from ..model.config import ModelConfig, RunConfig
from .budget import BudgetError, size
from .runtime import auto_budget, device_weight_bytes, experts_bytes, memory_plan


def resident_room(cfg: ModelConfig, run: RunConfig, device: torch.device, itemsize: int, context: int,
                  ckpt=None) -> int:
    """Bytes the run's budget leaves all resident for the experts, with the non-expert weights in the compute dtype
    or, where run.file_blocks, in a GGUF's blocks; 0 where not even the rest fits."""
    resident = replace(run, mode="gpu")
    weights = device_weight_bytes(cfg, ckpt, itemsize) if resident.weights_in_blocks else None
    try:
        return memory_plan(cfg, resident, device, itemsize, context, weights).cache_bytes
    except BudgetError:
        return 0


def resident_weights(cfg: ModelConfig, run: RunConfig, device: torch.device, itemsize: int, context: int,
                     ckpt=None) -> RunConfig:
    """Mode gpu with a budget: a GGUF's non-expert weights in its blocks where their copies in the compute dtype
    (faster) would leave too little for the experts (the Q4_K_M file of V2-Lite: 2.05 GiB in bf16, 0.81 in its
    blocks); where the blocks do not leave enough either, the plan's error then names the smaller need."""
    if run.mode != "gpu" or run.gpu_memory is None or not hasattr(ckpt, "ffn_layout"):
        return run
    if resident_room(cfg, run, device, itemsize, context, ckpt) < experts_bytes(cfg, run, itemsize, ckpt):
        return replace(run, file_blocks=True)
    return run


def choose_mode(cfg: ModelConfig, run: RunConfig, device: torch.device, itemsize: int,
                context: int, ckpt=None) -> tuple[RunConfig, str]:
    """Mode auto: everything resident if the experts fit (the free GPU memory, or --gpu-memory), with a GGUF's
    non-expert weights in its blocks if only so, else hybrid with a budget of the free memory less AUTO_MARGIN.
    -> (the run with a concrete mode, one line saying why)."""
    if device.type != "cuda":
        return replace(run, mode="gpu"), "mode auto: no GPU, everything resident on the CPU"
    budget = auto_budget(torch.cuda.mem_get_info(device)[0] + context, run.gpu_memory)
    trial = resident_weights(cfg, replace(run, mode="gpu", gpu_memory=budget), device, itemsize, context, ckpt)
    room = resident_room(cfg, trial, device, itemsize, context, ckpt)
    need = experts_bytes(cfg, run, itemsize, ckpt)
    if need <= room:
        blocks = ", the other weights in the file's blocks" if trial.file_blocks else ""
        return replace(run, mode="gpu", file_blocks=trial.file_blocks), \
            f"mode auto: gpu, every expert resident{blocks} ({size(need)} fit in {size(budget)})"
    return replace(run, mode="hybrid", gpu_memory=budget), \
        f"mode auto: hybrid within {size(budget)} (the experts need {size(need)}, {size(room)} would fit)"


def concrete_run(cfg: ModelConfig, run: RunConfig, device: torch.device, itemsize: int, context: int,
                 ckpt=None) -> tuple[RunConfig, str]:
    """The run with mode auto decided (choose_mode) and, all resident with a budget, where a GGUF's non-expert
    weights live (resident_weights) -> (run, a line saying what was chosen and why, or "")."""
    if run.mode == "auto":               # choose_mode has placed the weights of the resident run it picks
        return choose_mode(cfg, run, device, itemsize, context, ckpt)
    placed = resident_weights(cfg, run, device, itemsize, context, ckpt)
    if placed.file_blocks and not run.file_blocks:
        return placed, "mode gpu: the non-expert weights stay in the file's blocks (their copies in the compute " \
                       "dtype, which decode faster, would not fit --gpu-memory beside every expert)"
    return placed, ""

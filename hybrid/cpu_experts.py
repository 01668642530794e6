"""A layer's CPU experts in one TorchScript call: the loop over experts runs in C++, not in the interpreter."""
from __future__ import annotations

import warnings
from typing import List

import torch
import torch.nn.functional as F


def _run_cpu_experts(x: torch.Tensor, out: torch.Tensor, w13: List[torch.Tensor], w2: List[torch.Tensor],
                    starts: List[int], counts: List[int]) -> None:
    """out[s:s+c] = expert_j(x[s:s+c]) for each expert j (w13 [2I, Hd] gate then up rows, w2 [Hd, I])."""
    for j in range(len(w13)):
        s, c = starts[j], counts[j]
        gu = F.linear(x[s:s + c], w13[j])
        inter = gu.shape[-1] // 2
        out[s:s + c] = F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], w2[j])


with warnings.catch_warnings():             # torch 2.13 marks TorchScript deprecated; it still runs, GIL-free
    warnings.simplefilter("ignore", DeprecationWarning)
    run_cpu_experts = torch.jit.script(_run_cpu_experts)

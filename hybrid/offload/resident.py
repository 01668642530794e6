"""Routed-expert computation shared by every runtime, and the resident backend (mode `gpu`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..model.checkpoint import Checkpoint
from ..model.config import ModelConfig
from ..model.deepseek import gated_ffn


expert_ffn = gated_ffn           # one routed expert: the same SiLU-gated feed-forward


def read_expert(ckpt: Checkpoint, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(ckpt.get(n) for n in ckpt.expert_names(layer, expert))


def grouped_ffn(xs: torch.Tensor, offs: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Rows of xs grouped by expert (group g ends at offs[g]) through w13 [G, 2I, Hd] and w2 [G, Hd, I]."""
    g, u = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)    # [N, I] each
    return torch._grouped_mm(F.silu(g) * u, w2.transpose(1, 2), offs=offs)          # [N, Hd]


def grouped_experts(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
                    w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """All routed experts of a layer in two grouped GEMMs, with no host synchronisation.

    x [T, Hd], idx/w [T, K], w13 [E, 2I, Hd], w2 [E, Hd, I] -> [T, Hd]."""
    T, K = idx.shape
    flat = idx.reshape(-1)                                                   # [T*K]
    order = torch.argsort(flat, stable=True)                                 # [T*K]
    counts = torch.zeros(w13.shape[0], dtype=torch.int64, device=x.device)
    offs = counts.scatter_add_(0, flat, torch.ones_like(flat)).cumsum(0).to(torch.int32)  # [E], no host sync
    tok = order // K
    y = grouped_ffn(x.index_select(0, tok), offs, w13, w2)                   # [T*K, Hd]
    y = (y * w.reshape(-1)[order, None]).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, tok, y)


class ResidentExperts:
    """Every routed expert stacked on the compute device: the `gpu` mode and the speed ceiling."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, device, dtype: torch.dtype, progress: bool = True):
        E, I, Hd = cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.w13, self.w2 = {}, {}
        for layer in tqdm(cfg.moe_layers, desc="experts -> device", disable=not progress):
            w13 = torch.empty(E, 2 * I, Hd, dtype=dtype, device=device)
            w2 = torch.empty(E, Hd, I, dtype=dtype, device=device)
            for e in range(E):
                g, u, d = read_expert(ckpt, layer, e)
                w13[e, :I].copy_(g)
                w13[e, I:].copy_(u)
                w2[e].copy_(d)
            self.w13[layer], self.w2[layer] = w13, w2

    capturable = True

    wants_guess = False

    def set_threads(self, threads: int) -> None:
        """Nothing here runs on CPU threads of its own (the engine sets torch's)."""

    def begin(self, stats) -> None:
        """Nothing to count: every expert is resident."""

    def end(self, stats) -> None:
        """Nothing pending."""

    def forward(self, call) -> torch.Tensor:
        return grouped_experts(call.x, call.idx, call.w, self.w13[call.layer], self.w2[call.layer])

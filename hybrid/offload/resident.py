"""Routed-expert computation shared by every runtime, and the resident backend (mode `gpu`)."""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from tqdm import tqdm

from ..kernels.gemv_ffn import GEMV_ROWS, gemv_grouped_ffn
from ..kernels.quant_gpu import grouped_qffn
from ..model.checkpoint import Checkpoint
from ..model.config import ModelConfig
from ..model.deepseek import gated_ffn, grouped_ffn
from ..model.fused_moe import combine, group_by_expert
from ..model.quant import ExpertLayout


expert_ffn = gated_ffn           # one routed expert: the same SiLU-gated feed-forward


def read_expert(ckpt: Checkpoint, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(ckpt.get(n) for n in ckpt.expert_names(layer, expert))


def split_expert(buf: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of one flat expert buffer: w13 [2I, Hd] and w2 [Hd, I]."""
    I, Hd = cfg.moe_intermediate_size, cfg.hidden_size
    return buf[:2 * I * Hd].view(2 * I, Hd), buf[2 * I * Hd:].view(Hd, I)


def slot_ffn(slots: torch.Tensor, cfg: ModelConfig, quant: ExpertLayout | None) -> Callable:
    """The grouped FFN over every slot of `slots` ([S, one expert]: bf16 weights, or a quantized expert's bytes):
    ffn(xs [N, Hd], offs [S]) -> [N, Hd]. bf16 on a GPU: up to GEMV_ROWS rows through the matrix-vector kernels."""
    if quant is not None:
        return partial(grouped_qffn, slots=slots, lay=quant)
    I, Hd, n = cfg.moe_intermediate_size, cfg.hidden_size, cfg.expert_numel
    S = slots.shape[0]
    w13 = slots.as_strided((S, 2 * I, Hd), (n, Hd, 1))
    w2 = slots.as_strided((S, Hd, I), (n, I, 1), slots.storage_offset() + 2 * I * Hd)
    tiled = partial(grouped_ffn, w13=w13, w2=w2)
    return partial(_by_rows, partial(gemv_grouped_ffn, slots=slots), tiled) if slots.is_cuda else tiled


def _by_rows(gemv: Callable, tiled: Callable, xs: torch.Tensor, offs: torch.Tensor,
             grouping: tuple | None = None) -> torch.Tensor:
    return (gemv if xs.shape[0] <= GEMV_ROWS else tiled)(xs, offs, grouping=grouping)


def grouped_experts(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, ffn: Callable, E: int) -> torch.Tensor:
    """All routed experts of a layer in one grouped FFN (`slot_ffn` over its E experts), with no host
    synchronisation. x [T, Hd], idx/w [T, K] -> [T, Hd]."""
    g = group_by_expert(idx, E)
    y = ffn(x.index_select(0, g.rows), g.bounds[1:], grouping=g[1:3])       # [T*K, Hd] in sorted order
    return combine(y, g.rank, w)


class ResidentExperts:
    """Every routed expert stacked on the compute device: the `gpu` mode and the speed ceiling. Quantized
    experts (`quant`) stay quantized there."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, device, dtype: torch.dtype, progress: bool = True,
                 quant: ExpertLayout | None = None, host=None):
        E = cfg.n_routed_experts
        self.E, self.ffn = E, {}
        for layer in tqdm(cfg.moe_layers, desc="experts -> device", disable=not progress):
            own = None if quant is None else host.layout(layer)             # the layer's own layout
            if own is not None:                                               # [E, bytes] in it
                slots = torch.empty(E, own.nbytes, dtype=torch.uint8, device=device)
                slots.copy_(host.layer(layer)[:, :own.nbytes])
            else:
                slots = torch.empty(E, cfg.expert_numel, dtype=dtype, device=device)
                for e in range(E):
                    w13, w2 = split_expert(slots[e], cfg)
                    g, u, d = read_expert(ckpt, layer, e)
                    for dst, src in ((w13[:g.shape[0]], g), (w13[g.shape[0]:], u), (w2, d)):
                        dst.copy_(src)
            self.ffn[layer] = slot_ffn(slots, cfg, own)

    capturable = True

    wants_guess = False

    def set_threads(self, threads: int) -> None:
        """Nothing here runs on CPU threads of its own (the engine sets torch's)."""

    def begin(self, stats) -> None:
        """Nothing to count: every expert is resident."""

    def end(self, stats) -> None:
        """Nothing pending."""

    def forward(self, call) -> torch.Tensor:
        return grouped_experts(call.x, call.idx, call.w, self.ffn[call.layer], self.E)

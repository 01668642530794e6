"""Routed experts in host memory, one contiguous buffer per expert (w13 then w2), pinned for fast copies."""
from __future__ import annotations

import mmap
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import torch
from tqdm import tqdm

from ..model.checkpoint import Checkpoint
from ..model.config import ModelConfig
from ..model.quant import ExpertLayout, split_planes
from .budget import check_host_ram
from .quantized import load_quantized
from .resident import read_expert, split_expert


def huge_page_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised host tensor in anonymous memory advised to use transparent huge pages (fewer TLB misses
    when CPU experts stream their weights); a plain tensor where that is not available."""
    nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError, ValueError):
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype, count=torch.Size(shape).numel()).view(shape)


def pin_in_place(t: torch.Tensor) -> bool:
    """Page-lock an existing host tensor (cudaHostRegister): no power-of-two rounding, no second copy."""
    rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    return int(rc) == 0


class ExpertStore:
    """flat[layer_row, expert] is one expert: gate [I, Hd], up [I, Hd] (together w13), down [Hd, I], in the compute
    dtype; or, with `quant`, the expert's quantized planes (uint8, quant.py), made once and kept on disk
    (quantized.py); a layer in `layouts` (a GGUF's, at its own size, no larger than quant) in its own layout, at the
    start of its rows. `views[layer][e]` = (w13, w2): weight matrices, or each matrix's planes."""

    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, dtype: torch.dtype, pin: bool,
                 progress: bool = True, threads: int = 8, quant: ExpertLayout | None = None,
                 layouts: dict[int, ExpertLayout] | None = None):
        self.cfg, self.quant, self.dtype, self.layouts = cfg, quant, dtype, layouts or {}
        self.rows = {layer: r for r, layer in enumerate(cfg.moe_layers)}
        E = cfg.n_routed_experts
        self.numel, store_dtype = (cfg.expert_numel, dtype) if quant is None else (quant.nbytes, torch.uint8)
        self.expert_bytes = self.numel * torch.empty(0, dtype=store_dtype).element_size()
        check_host_ram(len(self.rows) * E * self.expert_bytes, psutil.virtual_memory().available)
        self.flat = huge_page_tensor((len(self.rows), E, self.numel), store_dtype)
        self.buffers = {layer: list(self.flat[r, :, :self.nbytes_of(layer)].unbind(0)) if quant is not None
                        else list(self.flat[r].unbind(0)) for layer, r in self.rows.items()}
        if quant is None:
            keys = [(layer, e) for layer in cfg.moe_layers for e in range(E)]
            with ThreadPoolExecutor(threads) as ex:
                for _ in tqdm(ex.map(lambda k: self._load(ckpt, *k), keys), total=len(keys),
                              desc="experts -> host", disable=not progress):
                    pass
        else:
            self.path = load_quantized(self.flat, self.rows, cfg, ckpt, quant, progress, threads, self.layouts)
        self.views = {layer: [self.weights(layer, e) for e in range(E)] for layer in self.rows}
        self.ratios = {layer: self.nbytes_of(layer) / self.expert_bytes for layer in self.rows}   # hot path
        self.pinned = pin and all(pin_in_place(self.flat[r]) for r in range(len(self.rows)))
        if pin and not self.pinned:
            raise RuntimeError("cudaHostRegister failed: cannot page-lock the expert store")

    def _load(self, ckpt: Checkpoint, layer: int, e: int) -> None:
        w13, w2 = self.weights(layer, e)
        g, u, d = (t.to(w2.dtype) for t in read_expert(ckpt, layer, e))
        I = g.shape[0]
        for dst, src in ((w13[:I], g), (w13[I:], u), (w2, d)):
            np.copyto(raw(dst), raw(src))          # a plain memcpy: no OpenMP team for each loader thread

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def buffer(self, layer: int, e: int) -> torch.Tensor:
        return self.buffers[layer][e]

    def layer(self, layer: int) -> torch.Tensor:
        """The layer's experts [E, one expert]."""
        return self.flat[self.rows[layer]]

    def layout(self, layer: int) -> ExpertLayout | None:
        """The layout of the layer's experts (None: unquantized)."""
        return self.layouts.get(layer, self.quant)

    def nbytes_of(self, layer: int) -> int:
        """Bytes of one of the layer's experts (a buffer's length)."""
        return self.expert_bytes if self.quant is None else self.layout(layer).nbytes

    def size_ratio(self, layer: int) -> float:
        """The layer's expert bytes against a whole row's (the calibrated format's): what its copies and CPU
        experts cost of the calibrated time."""
        return self.ratios[layer]

    def weights(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        buf = self.buffer(layer, e)
        return split_expert(buf, self.cfg) if self.quant is None else split_planes(self.layout(layer), buf)


def raw(t: torch.Tensor) -> np.ndarray:
    """The bytes of a contiguous tensor as a numpy array (numpy has no bfloat16)."""
    return t.contiguous().view(torch.uint8).numpy()

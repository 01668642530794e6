"""The GPU reading page-locked host memory itself: loads from the SMs over PCIe, inside a captured graph.

A small host-to-device copy queued on the compute stream goes through the copy engine, which runs it only after
the expert copies queued before it on the copy stream (seen in the box's prefill traces): a decode layer's row
layout would wait for that layer's fetches, and its CPU experts' results for the next layer's prefetches. These
kernels read the few kilobytes from host memory instead. Each has a torch twin, which CPU devices run."""
from __future__ import annotations

import numpy as np
import torch

from ..model import fused

if fused.triton is not None:
    tl = fused.tl

    @fused.triton.jit
    def _load_kernel(src_ptr, dst_ptr, N, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = i < N
        tl.store(dst_ptr + i, tl.load(src_ptr + i, mask=m), mask=m)

    @fused.triton.jit
    def _merge_kernel(ys_ptr, src_ptr, start_ptr, Hd, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        start = tl.load(start_ptr)
        if r >= start:
            c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            m = c < Hd
            v = tl.load(src_ptr + (r - start).to(tl.int64) * Hd + c, mask=m)
            tl.store(ys_ptr + r.to(tl.int64) * Hd + c, v, mask=m)


def load(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst (device, contiguous) <- src (page-locked host, same shape and dtype), read when the GPU runs it."""
    if not fused.on_triton(dst):
        dst.copy_(src)
        return
    n, block = dst.numel(), 1024
    _load_kernel[(fused.triton.cdiv(n, block),)](src, dst, n, BLOCK=block)


def merge_rows(ys: torch.Tensor, src: torch.Tensor, start: torch.Tensor) -> None:
    """ys [R, Hd] rows from int(start[0]) on <- src [R, Hd] (page-locked host) rows from 0 on; start: a
    one-element int32 tensor on ys's device, read when the GPU runs it."""
    R, Hd = ys.shape
    if not fused.on_triton(ys):             # no host sync (capturable where a CUDA device has no Triton)
        row = torch.arange(R, device=ys.device)
        rows = src.to(ys.device, non_blocking=True)[(row - start).clamp_min(0)]                       # [R, Hd]
        ys.copy_(torch.where((row >= start)[:, None], rows, ys))
        return
    block = 1024
    _merge_kernel[(R, fused.triton.cdiv(Hd, block))](ys, src, start, Hd, BLOCK=block)


class UploadRing:
    """Small int32 arrays for the device, through page-locked host slots that `load` reads (no copy engine, so
    nothing waits behind expert copies). A slot is rewritten only once the device has passed the event recorded
    behind its last read; the device copy it returns stays valid until `slots` more uploads. The default ring
    outlasts a layer's uploads (prefill's scratch: two per 8 experts), so the host does not wait on it while the
    layer's routing sync orders the layers. On a CPU device the arrays are copied as they are."""

    def __init__(self, device: torch.device, capacity: int, slots: int = 64):
        self.cuda = device.type == "cuda"
        self.host = torch.empty(slots, capacity, dtype=torch.int32, pin_memory=self.cuda)
        self.dev = torch.empty(slots, capacity, dtype=torch.int32, device=device)
        self.events: list = [None] * slots
        self.next = 0

    def __call__(self, values: np.ndarray) -> torch.Tensor:
        n = values.shape[0]
        if n > self.host.shape[1]:
            raise ValueError(f"{n} values do not fit an upload slot of {self.host.shape[1]}")
        i, self.next = self.next, (self.next + 1) % len(self.events)
        if self.events[i] is not None:
            self.events[i].synchronize()
        self.host[i, :n].numpy()[:] = values
        load(self.dev[i, :n], self.host[i, :n])
        if self.cuda:
            self.events[i] = torch.cuda.Event()
            self.events[i].record()
        return self.dev[i, :n]

"""Prefill over quantized expert slots: the active slots dequantized into a bf16 scratch, a few at a time (one
Triton kernel each time, memory-bound), then torch's grouped GEMM over the scratch. Where many tokens share an
expert this is faster than dequantizing inside the GEMM (quant_gpu.py): 0.26 ms per expert of 48 tokens there,
about 0.1 ms for cuBLAS on bf16 weights (H200). The caller knows on the host which slots hold rows, so nothing
synchronises."""
from __future__ import annotations

import numpy as np
import torch

from ..model.deepseek import grouped_ffn
from ..model.quant import ExpertLayout, Matrix, dequantize_expert
from .host_read import UploadRing
from .quant_gpu import plane_pointers, triton

CHUNK = 8                     # experts dequantized at once by default (a scratch of 138 MB for V2-Lite in bf16)
MIN_ROWS = 128                # groups of fewer rows stay on quant_gpu's fused kernels

if triton is not None:
    import triton.language as tl

    from .quant_gpu import group_scale, int8_float, nibble_float, q5_halves, slot_planes

    @triton.jit
    def _dequant_kernel(q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, ids_ptr, out_ptr, slot_bytes, R: tl.constexpr,
                        C: tl.constexpr, KIND: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr):
        """out[i, rows, cols] = matrix of slot ids[i], dequantized (a block of BR rows x BC columns)."""
        s = tl.load(ids_ptr + tl.program_id(0)).to(tl.int64)
        q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr = slot_planes(q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, s, slot_bytes, KIND)
        out_ptr += tl.program_id(0).to(tl.int64) * R * C
        r = tl.program_id(1) * BR + tl.arange(0, BR)[:, None]                                    # [BR, 1]
        if KIND == 1:
            c = tl.program_id(2) * BC + tl.arange(0, BC)[None, :]                                # [1, BC]
            d, _ = group_scale(d_ptr, m_ptr, sc_ptr, mn_ptr, r * (C // 32) + c // 32, 0, KIND)
            w = int8_float(tl.load(q_ptr + r * C + c)) * d
            tl.store(out_ptr + r * C + c, w.to(out_ptr.dtype.element_ty))
        elif KIND == 5:
            rows = tl.program_id(1) * BR + tl.arange(0, BR)
            lo, hi = q5_halves(q_ptr, d_ptr, m_ptr, rows, tl.program_id(2) * BC, C, BR, BC)             # [BR, BC/2]
            j = tl.arange(0, BC // 2)[None, :]
            col = tl.program_id(2) * BC + (j // 16) * 32 + j % 16
            tl.store(out_ptr + r * C + col, lo.to(out_ptr.dtype.element_ty))
            tl.store(out_ptr + r * C + col + 16, hi.to(out_ptr.dtype.element_ty))
        else:
            j = tl.program_id(2) * (BC // 2) + tl.arange(0, BC // 2)[None, :]                    # byte in the row
            b = tl.load(q_ptr + r * (C // 2) + j).to(tl.int32)
            d, m = group_scale(d_ptr, m_ptr, sc_ptr, mn_ptr, r * (C // 32) + j // 16, r * (C // 256) + j // 128,
                               KIND)
            col = (j // 16) * 32 + j % 16
            tl.store(out_ptr + r * C + col, (nibble_float(b & 15) * d + m).to(out_ptr.dtype.element_ty))
            tl.store(out_ptr + r * C + col + 16, (nibble_float(b >> 4) * d + m).to(out_ptr.dtype.element_ty))


def _dequant_matrix(slots: torch.Tensor, mat: Matrix, planes: tuple, ids: torch.Tensor, out: torch.Tensor) -> None:
    """planes: plane_pointers(slots, mat), which the caller keeps (a dozen tensor views, each call's host time)."""
    BR, BC = 8, 256 if mat.cols % 256 == 0 else 128 if mat.cols % 128 == 0 else 32
    _dequant_kernel[(ids.shape[0], mat.rows // BR, mat.cols // BC)](*planes, ids, out, slots.stride(0), mat.rows,
                                                                    mat.cols, KIND=mat.code, BR=BR, BC=BC)


class ScratchFFN:
    """ffn(xs [N, Hd], slot_ends [S] (host: cumulative rows per slot)[, lay, out]) -> [N, Hd], for the slots of
    `slots`. Per chunk of experts: one upload (their slot ids and row offsets), two dequantizations, the grouped
    FFN, one copy into the output rows: prefill at batch 16 launches these one by one from the host, which sets
    its pace there (eval/results/resident_h200)."""

    def __init__(self, slots: torch.Tensor, lay: ExpertLayout, dtype: torch.dtype, chunk: int = CHUNK):
        I, Hd = lay.w2.cols, lay.w2.rows
        self.slots, self.lay, self.cuda, self.chunk = slots, lay, slots.device.type == "cuda", chunk
        self.w13 = torch.empty(chunk, 2 * I, Hd, dtype=dtype, device=slots.device)
        self.w2 = torch.empty(chunk, Hd, I, dtype=dtype, device=slots.device)
        self.upload = UploadRing(slots.device, 2 * chunk)  # ids and offsets: not behind the copy engine's queue
        self.planes: dict[Matrix, tuple] = {}

    def _planes(self, mat: Matrix) -> tuple:
        if mat not in self.planes:
            self.planes[mat] = plane_pointers(self.slots, mat)
        return self.planes[mat]

    def _dequantize(self, ids: np.ndarray, dev: torch.Tensor, lay: ExpertLayout) -> None:
        """The experts in slots `ids` (host) into the scratch's first rows; dev: the same ids on the device."""
        n = ids.shape[0]
        if not self.cuda:
            for i, s in enumerate(ids.tolist()):
                self.w13[i], self.w2[i] = dequantize_expert(lay, self.slots[s], self.w13.dtype)
            return
        _dequant_matrix(self.slots, lay.w13, self._planes(lay.w13), dev, self.w13[:n])
        _dequant_matrix(self.slots, lay.w2, self._planes(lay.w2), dev, self.w2[:n])

    def __call__(self, xs: torch.Tensor, slot_ends: np.ndarray, lay: ExpertLayout | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """`lay`: the layout of the experts in the slots it reads (default: the one it was made with); `out`: the
        rows [N, Hd] to write (default: new ones)."""
        counts = np.diff(slot_ends, prepend=0)
        active = np.flatnonzero(counts)
        ys = torch.empty_like(xs) if out is None else out
        r0 = 0
        for c in range(0, active.shape[0], self.chunk):
            ids = active[c:c + self.chunk]
            n, rows = ids.shape[0], counts[ids]
            r1 = r0 + int(rows.sum())
            dev = self.upload(np.concatenate([ids, np.cumsum(rows)]))                   # [2n]: ids | offsets
            self._dequantize(ids, dev[:n], lay or self.lay)
            ys[r0:r1] = grouped_ffn(xs[r0:r1], dev[n:], self.w13[:n], self.w2[:n])
            r0 = r1
        return ys

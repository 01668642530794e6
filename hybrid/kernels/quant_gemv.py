"""Grouped expert FFNs at decode row counts: a matrix-vector kernel per row, with no tensor-core tile.

At one or two rows per expert the tiled kernels of quant_gpu.py spend their time turning dequantized weights into
tensor-core operands (a layout change through shared memory per weight), not reading bytes: 6 experts in q4 take
~40 us whatever the split of the reduction (`eval/results/step_h200/split_probe.json`). Here a program owns a slot
and a block of output rows, dequantizes its weights in registers ([rows, groups, 32 or 16] tiles, so no reshape),
multiplies each by the row's input and keeps the products in a register tile that is summed once, at the end.
The weights are rounded to the compute dtype after dequantizing, as the tiled kernels and the reference round
them; only the order of the fp32 sums differs.

`gemv_grouped_ffn(xs, offs, slots, lay)` takes quant_gpu's arguments (lay None: bf16 slots, w13 then w2 in each
row of `slots`); callers pick it for small row counts (GEMV_ROWS)."""
from __future__ import annotations

import torch

from ..model.quant import ExpertLayout
from .quant_gpu import active_order, int8_float, nibble_float, plane_pointers, slot_planes, triton

if triton is not None:
    import triton.language as tl

GEMV_ROWS = 16                  # rows (tokens x picks) up to which callers take this path


if triton is not None:
    @triton.jit
    def _scales(d_ptr, m_ptr, sc_ptr, mn_ptr, r3, g3, m3, K: tl.constexpr, KIND: tl.constexpr):
        """Scale and offset [BN, G, 1] (fp32) of groups g3 of rows r3, so that w = q * d + m (q8: m = 0)."""
        sidx = r3 * (K // 32) + g3
        if KIND == 3:             # q4k: fp16 d, dmin per 256 columns times 6-bit sc, mn per 32
            kidx = r3 * (K // 256) + g3 // 8
            d = tl.load(d_ptr + kidx, mask=m3, other=0.0).to(tl.float32) * \
                tl.load(sc_ptr + sidx, mask=m3, other=0).to(tl.float32)
            m = -(tl.load(m_ptr + kidx, mask=m3, other=0.0).to(tl.float32) *
                  tl.load(mn_ptr + sidx, mask=m3, other=0).to(tl.float32))
        elif KIND == 2:
            d = tl.load(d_ptr + sidx, mask=m3, other=0.0).to(tl.float32)
            m = tl.load(m_ptr + sidx, mask=m3, other=0.0).to(tl.float32)
        else:
            d = tl.load(d_ptr + sidx, mask=m3, other=0.0).to(tl.float32)
            m = d * 0.0
        return d, m

    @triton.jit
    def _tile(acc, x_ptr, xr, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, rows, k0, K: tl.constexpr, KIND: tl.constexpr,
              G: tl.constexpr, W: tl.constexpr, ROUND: tl.constexpr):
        """acc [BN, G, W] += w * x over columns k0 .. k0 + 32 G of weight rows `rows` and input row xr; groups past
        K are masked. KIND 0: bf16 weights; 1: q8; 2: q4; 3: q4k (W = 16: a byte holds columns i and i + 16)."""
        dt = x_ptr.dtype.element_ty
        g3 = (k0 // 32 + tl.arange(0, G))[None, :, None]                                   # [1, G, 1]
        m3 = g3 < K // 32
        i3 = tl.arange(0, W)[None, None, :]                                                # [1, 1, W]
        r3 = rows[:, None, None]                                                           # [BN, 1, 1]
        col = g3 * 32 + i3                                                                 # [1, G, W]
        x = tl.load(x_ptr + xr * K + col, mask=m3, other=0.0).to(tl.float32)
        if KIND == 0:
            w = tl.load(q_ptr + r3 * K + col, mask=m3, other=0.0).to(tl.float32)           # [BN, G, 32]
            acc += w * x
        elif KIND == 1:
            d, m = _scales(d_ptr, m_ptr, sc_ptr, mn_ptr, r3, g3, m3, K, KIND)
            w = int8_float(tl.load(q_ptr + r3 * K + col, mask=m3, other=0)) * d
            if ROUND:
                w = w.to(dt).to(tl.float32)
            acc += w * x
        else:
            d, m = _scales(d_ptr, m_ptr, sc_ptr, mn_ptr, r3, g3, m3, K, KIND)
            b = tl.load(q_ptr + r3 * (K // 2) + g3 * 16 + i3, mask=m3, other=0).to(tl.int32)   # [BN, G, 16]
            x_hi = tl.load(x_ptr + xr * K + col + 16, mask=m3, other=0.0).to(tl.float32)
            lo = nibble_float(b & 15) * d + m
            hi = nibble_float(b >> 4) * d + m
            if ROUND:
                lo, hi = lo.to(dt).to(tl.float32), hi.to(dt).to(tl.float32)
            acc += lo * x + hi * x_hi
        return acc

    @triton.jit
    def _gate_up_gemv(x_ptr, h_ptr, bounds_ptr, order_ptr, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, slot_stride,
                      I: tl.constexpr, K: tl.constexpr, KIND: tl.constexpr, BN: tl.constexpr, G: tl.constexpr,
                      W: tl.constexpr, ROUND: tl.constexpr):
        s = tl.load(order_ptr + tl.program_id(1))
        start, end = tl.load(bounds_ptr + s), tl.load(bounds_ptr + s + 1)
        q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr = slot_planes(q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, s, slot_stride)
        n = tl.program_id(0) * BN + tl.arange(0, BN)    # gate rows; up rows are n + I
        dt = x_ptr.dtype.element_ty
        r = start
        while r < end:
            g = tl.zeros((BN, G, W), dtype=tl.float32)
            u = tl.zeros((BN, G, W), dtype=tl.float32)
            for k0 in range(0, K, 32 * G):
                g = _tile(g, x_ptr, r, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n, k0, K, KIND, G, W, ROUND)
                u = _tile(u, x_ptr, r, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n + I, k0, K, KIND, G, W, ROUND)
            gr = tl.sum(tl.sum(g, 2), 1).to(dt).to(tl.float32)                              # [BN]
            silu = (gr / (1.0 + tl.exp(-gr))).to(dt).to(tl.float32)
            h = (silu * tl.sum(tl.sum(u, 2), 1).to(dt).to(tl.float32)).to(dt)
            tl.store(h_ptr + r * I + n, h)
            r += 1

    @triton.jit
    def _down_gemv(h_ptr, y_ptr, bounds_ptr, order_ptr, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, slot_stride,
                   N: tl.constexpr, K: tl.constexpr, KIND: tl.constexpr, BN: tl.constexpr, G: tl.constexpr,
                   W: tl.constexpr, ROUND: tl.constexpr):
        s = tl.load(order_ptr + tl.program_id(1))
        start, end = tl.load(bounds_ptr + s), tl.load(bounds_ptr + s + 1)
        q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr = slot_planes(q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, s, slot_stride)
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        r = start
        while r < end:
            acc = tl.zeros((BN, G, W), dtype=tl.float32)
            for k0 in range(0, K, 32 * G):
                acc = _tile(acc, h_ptr, r, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n, k0, K, KIND, G, W, ROUND)
            tl.store(y_ptr + r * N + n, tl.sum(tl.sum(acc, 2), 1).to(y_ptr.dtype.element_ty))
            r += 1


def _planes(slots: torch.Tensor, mat, offset: int) -> tuple:
    """(q, d, m, sc, mn) base tensors of slot 0 for a quantized matrix `mat`, or bf16 weights at `offset`."""
    if mat is not None:
        return plane_pointers(slots, mat)
    w = slots[0, offset:]
    return (w,) * 5


def gemv_grouped_ffn(xs: torch.Tensor, offs: torch.Tensor, slots: torch.Tensor, lay: ExpertLayout | None,
                     grouping: tuple | None = None, bn: int = 16, groups: int = 8, warps: int = 4,
                     round_weights: bool = True) -> torch.Tensor:
    """xs [N, Hd] (rows grouped by slot, group g ending at offs[g]); slots [S, bytes] uint8 (lay: its format) or
    [S, expert numel] bf16 (lay None) -> [N, Hd]. bn: output rows per program; groups: 32-column groups per step
    of the reduction; warps: Triton's num_warps."""
    N, Hd = xs.shape
    y = torch.empty(N, Hd, dtype=xs.dtype, device=xs.device)
    if N == 0:
        return y
    I = lay.w2.cols if lay is not None else (slots.shape[1] // Hd) // 3
    w13, w2 = (lay.w13, lay.w2) if lay is not None else (None, None)
    kinds = (w13.code, w2.code) if lay is not None else (0, 0)
    bounds, order = grouping or active_order(offs)
    h = torch.empty(N, I, dtype=xs.dtype, device=xs.device)
    S, stride = min(N, slots.shape[0]), slots.stride(0)
    width = [32 if k < 2 else 16 for k in kinds]
    _gate_up_gemv[(I // min(bn, I), S)](xs, h, bounds, order, *_planes(slots, w13, 0), stride, I, Hd,
                                        KIND=kinds[0], BN=min(bn, I), G=groups, W=width[0], ROUND=round_weights,
                                        num_warps=warps)
    _down_gemv[(Hd // min(bn, Hd), S)](h, y, bounds, order, *_planes(slots, w2, 2 * I * Hd), stride, Hd, I,
                                       KIND=kinds[1], BN=min(bn, Hd), G=groups, W=width[1], ROUND=round_weights,
                                       num_warps=warps)
    return y

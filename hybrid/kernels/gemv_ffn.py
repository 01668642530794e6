"""Grouped bf16 expert FFNs at decode row counts: a matrix-vector kernel per row, with no tensor-core tile.

At one or two rows per expert torch._grouped_mm reads 6 bf16 experts (104 MB) in ~67 us on the H200 (1.5 TB/s);
these kernels take ~48 us (2.2 TB/s; `eval/results/step_h200/gemv/`). A program owns a slot and a block of output
rows, multiplies [rows, groups, 32] weight tiles by the row's input in registers and keeps the products in a
register tile that is summed once, at the end: the same products as the GEMM, summed in another order (fp32).
(The same kernels over q4 / q8 weights were no faster than quant_gpu.py's tiled ones: not used there.)

`gemv_grouped_ffn(xs, offs, slots)` takes slots [S, expert numel] (w13 then w2 in each row); callers pick it up to
GEMV_ROWS rows."""
from __future__ import annotations

import torch

from .quant_gpu import active_order, triton

if triton is not None:
    import triton.language as tl

GEMV_ROWS = 16                  # rows (tokens x picks) up to which callers take this path


if triton is not None:
    @triton.jit
    def _tile(acc, x_ptr, xr, w_ptr, rows, k0, K: tl.constexpr, G: tl.constexpr):
        """acc [BN, G, 32] += W[rows, k0:k0 + 32 G] * x[xr, k0:k0 + 32 G]; columns past K masked."""
        col = (k0 + 32 * tl.arange(0, G))[None, :, None] + tl.arange(0, 32)[None, None, :]   # [1, G, 32]
        mask = col < K
        x = tl.load(x_ptr + xr * K + col, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + rows[:, None, None] * K + col, mask=mask, other=0.0).to(tl.float32)  # [BN, G, 32]
        return acc + w * x

    @triton.jit
    def _program(bounds_ptr, order_ptr, w_ptr, slot_stride, BN: tl.constexpr):
        """This program's rows of xs [start, end), its slot's weights and its block of output rows."""
        s = tl.load(order_ptr + tl.program_id(1))
        start, end = tl.load(bounds_ptr + s), tl.load(bounds_ptr + s + 1)
        return start, end, w_ptr + s.to(tl.int64) * slot_stride, tl.program_id(0) * BN + tl.arange(0, BN)

    @triton.jit
    def _gate_up_gemv(x_ptr, h_ptr, bounds_ptr, order_ptr, w_ptr, slot_stride, I: tl.constexpr, K: tl.constexpr,
                      BN: tl.constexpr, G: tl.constexpr):
        start, end, w_ptr, n = _program(bounds_ptr, order_ptr, w_ptr, slot_stride, BN)   # up rows: n + I
        dt = x_ptr.dtype.element_ty
        r = start
        while r < end:                                  # (a while loop: Triton's interpreter takes no range here)
            g = tl.zeros((BN, G, 32), dtype=tl.float32)
            u = tl.zeros((BN, G, 32), dtype=tl.float32)
            for k0 in range(0, K, 32 * G):
                g = _tile(g, x_ptr, r, w_ptr, n, k0, K, G)
                u = _tile(u, x_ptr, r, w_ptr, n + I, k0, K, G)
            gr = tl.sum(tl.sum(g, 2), 1).to(dt).to(tl.float32)                              # [BN]
            silu = (gr / (1.0 + tl.exp(-gr))).to(dt).to(tl.float32)
            h = (silu * tl.sum(tl.sum(u, 2), 1).to(dt).to(tl.float32)).to(dt)
            tl.store(h_ptr + r * I + n, h)
            r += 1

    @triton.jit
    def _down_gemv(h_ptr, y_ptr, bounds_ptr, order_ptr, w_ptr, slot_stride, N: tl.constexpr, K: tl.constexpr,
                   BN: tl.constexpr, G: tl.constexpr):
        start, end, w_ptr, n = _program(bounds_ptr, order_ptr, w_ptr, slot_stride, BN)
        r = start
        while r < end:
            acc = tl.zeros((BN, G, 32), dtype=tl.float32)
            for k0 in range(0, K, 32 * G):
                acc = _tile(acc, h_ptr, r, w_ptr, n, k0, K, G)
            tl.store(y_ptr + r * N + n, tl.sum(tl.sum(acc, 2), 1).to(y_ptr.dtype.element_ty))
            r += 1


def gemv_grouped_ffn(xs: torch.Tensor, offs: torch.Tensor, slots: torch.Tensor, grouping: tuple | None = None,
                     bn: int = 8, groups: int = 8, warps: int = 4) -> torch.Tensor:
    """xs [N, Hd] (rows grouped by slot, group g ending at offs[g]), slots [S, 3 I Hd] -> [N, Hd]. grouping:
    (bounds [S + 1], the slots with rows first [S]) as fused.group_by_expert gives them, when the caller has them;
    bn: output rows per program; groups: 32-column groups per step of the reduction (the shape measured best at
    1-8 tokens, `gemv_probe.py`); warps: Triton's num_warps."""
    N, Hd = xs.shape
    y = torch.empty(N, Hd, dtype=xs.dtype, device=xs.device)
    if N == 0:
        return y
    I = slots.shape[1] // Hd // 3
    bounds, order = grouping or active_order(offs)
    h = torch.empty(N, I, dtype=xs.dtype, device=xs.device)
    S, stride = min(N, slots.shape[0]), slots.stride(0)
    _gate_up_gemv[(I // min(bn, I), S)](xs, h, bounds, order, slots[0], stride, I, Hd, BN=min(bn, I), G=groups,
                                        num_warps=warps)
    _down_gemv[(Hd // min(bn, Hd), S)](h, y, bounds, order, slots[0, 2 * I * Hd:], stride, Hd, I, BN=min(bn, Hd),
                                       G=groups, num_warps=warps)
    return y

"""Decode-sized grouped FFNs over quantized slots with the reduction split across programs.

At decode a slot has 1-16 rows, so quant_gpu's kernels give each program a whole reduction (2,048 or 1,408 columns)
over a block of output columns: few programs, each a long serial loop, and ~0.65 TB/s of weights read. Here the
reduction is cut in `split` ranges, one program each, whose fp32 partial sums go to a workspace; a small kernel adds
the partials in order and applies SiLU times up (gate/up) or rounds (down). Four launches instead of two, many more
bytes in flight. Rounding as quant_gpu's kernels: to the compute dtype after each linear, after SiLU and after the
product; only the order of the fp32 additions differs."""
from __future__ import annotations

import torch

from ..model.quant import ExpertLayout
from .quant_gpu import _block, active_order, plane_pointers, triton

if triton is not None:
    import triton.language as tl

    from .quant_gpu import _dot_tile, _group_rows, slot_planes

    @triton.jit
    def _partial_rows(x_ptr, ws_ptr, xrow, rmask, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n, sp, OUT: tl.constexpr,
                      HALF: tl.constexpr, K: tl.constexpr, KS: tl.constexpr, KIND: tl.constexpr, BM: tl.constexpr,
                      BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        a = tl.zeros((BM, BN), dtype=tl.float32)
        b = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(0, KS, BK):
            k0 = sp * KS + kk
            a = _dot_tile(a, x_ptr, xrow, rmask, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n, k0, K, KIND, BN, BK, PREC)
            if HALF > 0:
                b = _dot_tile(b, x_ptr, xrow, rmask, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n + HALF, k0, K, KIND, BN,
                              BK, PREC)
        tl.store(ws_ptr + xrow[:, None] * OUT + n[None, :], a, mask=rmask[:, None])
        if HALF > 0:
            tl.store(ws_ptr + xrow[:, None] * OUT + (n + HALF)[None, :], b, mask=rmask[:, None])

    @triton.jit
    def _partial_kernel(x_ptr, ws_ptr, bounds_ptr, order_ptr, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, slot_bytes, N,
                        OUT: tl.constexpr, HALF: tl.constexpr, K: tl.constexpr, KS: tl.constexpr,
                        KIND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        PREC: tl.constexpr, ONE_BLOCK: tl.constexpr):
        """ws[split, row, col] = x[row, KS split + (0..KS)] . W[col, same] for this slot's rows and BN of the OUT
        output columns (HALF > 0: the columns come from rows c and c + HALF of W, gate and up). ONE_BLOCK: the
        caller knows no slot has more than BM rows (then the reduction loop is the kernel's outer loop)."""
        s, start, end = _group_rows(bounds_ptr, order_ptr)
        q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr = slot_planes(q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, s, slot_bytes)
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        sp = tl.program_id(2)
        ws_ptr += sp.to(tl.int64) * N * OUT
        if ONE_BLOCK:
            xrow = start + tl.arange(0, BM)
            _partial_rows(x_ptr, ws_ptr, xrow, xrow < end, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n, sp, OUT, HALF, K,
                          KS, KIND, BM, BN, BK, PREC)
        else:
            r0 = start
            while r0 < end:                           # (a while loop: Triton's interpreter takes no range here)
                xrow = r0 + tl.arange(0, BM)
                _partial_rows(x_ptr, ws_ptr, xrow, xrow < end, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n, sp, OUT, HALF,
                              K, KS, KIND, BM, BN, BK, PREC)
                r0 += BM

    @triton.jit
    def _finish_kernel(ws_ptr, out_ptr, N, OUT: tl.constexpr, COLS: tl.constexpr, SPLIT: tl.constexpr,
                       SILU: tl.constexpr, BLOCK: tl.constexpr):
        """out[row, c] for c < COLS: the partials summed in order, then (SILU) silu(gate) * up with gate in column c
        and up in column c + COLS, or the sum rounded."""
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < COLS
        dt = out_ptr.dtype.element_ty
        a = tl.zeros((BLOCK,), dtype=tl.float32)
        b = tl.zeros((BLOCK,), dtype=tl.float32)
        for sp in tl.static_range(SPLIT):
            row = ws_ptr + (sp * N + r) * OUT
            a += tl.load(row + c, mask=m, other=0.0)
            if SILU:
                b += tl.load(row + COLS + c, mask=m, other=0.0)
        if SILU:
            g = a.to(dt).to(tl.float32)
            silu = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
            a = silu * b.to(dt).to(tl.float32)
        tl.store(out_ptr + r * COLS + c, a.to(dt), mask=m)


def split_of(K: int, want: int) -> tuple[int, int]:
    """(split, bk): at most `want` ranges of the K reduction columns, each whole groups of 32 and whole blocks of bk
    (128, 64 or 32, the largest that fits)."""
    split = max(s for s in range(1, want + 1) if K % s == 0 and (K // s) % 32 == 0)
    return split, _block(K // split, 128)


def split_grouped_qffn(xs: torch.Tensor, offs: torch.Tensor, slots: torch.Tensor, lay: ExpertLayout,
                       splits: tuple[int, int] = (4, 4), bn: int = 32, warps: int = 4, stages: int = 3,
                       grouping: tuple | None = None, one_block: bool = False) -> torch.Tensor:
    """quant_gpu.triton_grouped_qffn's function for decode-sized xs [N, Hd] (N <= ~128): `splits` caps the ranges
    of gate/up's and down's reductions; bn the output columns per program."""
    N, Hd = xs.shape
    S, I = slots.shape[0], lay.w2.cols
    y = torch.empty(N, Hd, dtype=xs.dtype, device=xs.device)
    if N == 0:
        return y
    prec = "ieee" if xs.dtype == torch.float32 else "tf32"
    bounds, order = grouping or active_order(offs)
    groups = min(N, S)
    h = torch.empty(N, I, dtype=xs.dtype, device=xs.device)
    for x, out, mat, K, cols, half, want in ((xs, h, lay.w13, Hd, I, I, splits[0]),
                                             (h, y, lay.w2, I, Hd, 0, splits[1])):
        split, bk = split_of(K, want)
        width = cols + half
        ws = torch.empty(split, N, width, dtype=torch.float32, device=xs.device)
        b = _block(cols, bn)
        _partial_kernel[(cols // b, groups, split)](x, ws, bounds, order, *plane_pointers(slots, mat),
                                                    slots.stride(0), N, OUT=width, HALF=half, K=K, KS=K // split,
                                                    KIND=mat.code, BM=16, BN=b, BK=bk, PREC=prec, num_warps=warps,
                                                    num_stages=stages, ONE_BLOCK=one_block)
        _finish_kernel[(N, triton.cdiv(cols, 1024))](ws, out, N, OUT=width, COLS=cols, SPLIT=split, SILU=half > 0,
                                                     BLOCK=1024, num_warps=4)
    return y

"""Grouped expert FFNs over quantized expert slots (quant.py's q8 / q5 / q4 / q4k planes): Triton kernels that
dequantize in registers and multiply on tensor cores, with fp32 accumulation.

`grouped_qffn(xs, offs, slots, lay)` is the quantized twin of deepseek.grouped_ffn: rows of xs grouped by slot
(group g ends at offs[g]) through each slot's expert. Two kernels: gate and up together, whose programs write
h = silu(gate) * up, then down. A program owns one active slot and a block of output columns and walks the slot's
rows in blocks of BM; its grid is fixed by the shapes (no host synchronisation: it can be captured in a CUDA
graph), the active slots are found on the device. Intermediate values are rounded to the compute dtype where
torch's path rounds them (after each linear, after silu, after the product). Prefill-sized groups whose slots
the host knows go through quant_scratch.py instead.

`QuantizedLinear` is one matrix in planes (a GGUF file's attention projections or output head): the same tile loop
as the down kernel, for any rows. On a CPU device (tests) the same functions run in torch: each active slot's
expert (or the matrix) dequantized, then the FFN (or F.linear)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..model.deepseek import gated_ffn
from ..model.quant import ExpertLayout, Matrix, dequantize_expert, dequantize_matrix

try:
    import triton
    import triton.language as tl
except ImportError:               # CPU-only installs: the torch path below serves them
    triton = None

if triton is not None:
    @triton.jit
    def nibble_float(v):
        """float(v) for 0 <= v < 2^23 (an int32), exactly: v under the exponent of float 2^23, less 2^23 (two
        full-rate instructions; a conversion runs at a quarter of the rate)."""
        return (v | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def int8_float(q):
        """float(q) for an int8 q, exactly, as nibble_float."""
        return (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0

    @triton.jit
    def group_scale(d_ptr, m_ptr, sc_ptr, mn_ptr, g, k, KIND: tl.constexpr):
        """Scale d and offset m (fp32) of the groups at index g of the per-32 planes (k: of q4k's per-256 planes),
        so that w = q d + m (q8: m unused)."""
        if KIND == 3:                 # q4k: fp16 d, dmin per 256 columns times 6-bit sc, mn per 32
            d = tl.load(d_ptr + k).to(tl.float32) * tl.load(sc_ptr + g).to(tl.float32)
            m = -(tl.load(m_ptr + k).to(tl.float32) * tl.load(mn_ptr + g).to(tl.float32))
        else:
            d = tl.load(d_ptr + g).to(tl.float32)
            m = tl.load(m_ptr + g).to(tl.float32) if KIND == 2 else d
        return d, m

    @triton.jit
    def _group_scales(d_ptr, m_ptr, sc_ptr, mn_ptr, rows, k0, K: tl.constexpr, BK: tl.constexpr,
                      KIND: tl.constexpr):
        """Scale and min [BN, G, 1] (fp32) of the groups of 32 in columns k0..k0+BK of `rows`."""
        g = k0 // 32 + tl.arange(0, BK // 32)
        d, m = group_scale(d_ptr, m_ptr, sc_ptr, mn_ptr, rows[:, None] * (K // 32) + g[None, :],
                           rows[:, None] * (K // 256) + (g // 8)[None, :], KIND)                 # [BN, G]
        return d[:, :, None], m[:, :, None]

    @triton.jit
    def q5_halves(q_ptr, d_ptr, qh_ptr, rows, k0, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """q5 weights of `rows` at columns k0..k0+BK in fp32, as the q4 branch orders them: ([BN, BK/2] columns
        g*32 + i, [BN, BK/2] columns g*32 + 16 + i), i < 16; w = d (q - 16), q's fifth bit from qh."""
        gi = rows[:, None] * (K // 32) + (k0 // 32 + tl.arange(0, BK // 32))[None, :]               # [BN, G]
        d = tl.load(d_ptr + gi).to(tl.float32)[:, :, None]                                          # [BN, G, 1]
        qh = tl.load(qh_ptr + gi)[:, :, None]                                                       # int32
        j = tl.arange(0, BK // 2)
        b = tl.reshape(tl.load(q_ptr + rows[:, None] * (K // 2) + (k0 // 2 + j)[None, :]).to(tl.int32),
                       (BN, BK // 32, 16))
        i = tl.arange(0, 16)[None, None, :]
        lo = (b & 15) | (((qh >> i) & 1) << 4)
        hi = (b >> 4) | (((qh >> (i + 16)) & 1) << 4)
        return (tl.reshape((nibble_float(lo) - 16.0) * d, (BN, BK // 2)),
                tl.reshape((nibble_float(hi) - 16.0) * d, (BN, BK // 2)))

    @triton.jit
    def _dot_tile(acc, x_ptr, xrow, rmask, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, rows, k0, K: tl.constexpr,
                  KIND: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        """acc [BM, BN] += x[xrow, k0:k0+BK] @ W[rows, k0:k0+BK]^T, W dequantized here: one scale (and min) per
        32 columns, loaded once per group and broadcast (q6k: one scale per 16, d times the int8 sc)."""
        dt = x_ptr.dtype.element_ty
        if KIND == 4:
            k = k0 + tl.arange(0, BK)
            q = int8_float(tl.load(q_ptr + rows[:, None] * K + k[None, :]))                      # [BN, BK]
            g = k0 // 16 + tl.arange(0, BK // 16)
            s = (tl.load(sc_ptr + rows[:, None] * (K // 16) + g[None, :]).to(tl.float32)
                 * tl.load(d_ptr + rows[:, None] * (K // 256) + (g // 16)[None, :]).to(tl.float32))  # [BN, BK/16]
            w = tl.reshape(tl.reshape(q, (BN, BK // 16, 16)) * s[:, :, None], (BN, BK))
            x = tl.load(x_ptr + xrow[:, None] * K + k[None, :], mask=rmask[:, None], other=0.0)
            acc = acc + tl.dot(x, tl.trans(w.to(dt)), input_precision=PREC)
        elif KIND == 1:
            d, m = _group_scales(d_ptr, m_ptr, sc_ptr, mn_ptr, rows, k0, K, BK, KIND)              # [BN, G, 1]
            k = k0 + tl.arange(0, BK)
            q = int8_float(tl.load(q_ptr + rows[:, None] * K + k[None, :]))                      # [BN, BK]
            w = tl.reshape(tl.reshape(q, (BN, BK // 32, 32)) * d, (BN, BK))
            x = tl.load(x_ptr + xrow[:, None] * K + k[None, :], mask=rmask[:, None], other=0.0)
            acc = acc + tl.dot(x, tl.trans(w.to(dt)), input_precision=PREC)
        elif KIND == 5:
            lo, hi = q5_halves(q_ptr, d_ptr, m_ptr, rows, k0, K, BN, BK)
            j = tl.arange(0, BK // 2)
            klo = k0 + (j // 16) * 32 + j % 16
            x_lo = tl.load(x_ptr + xrow[:, None] * K + klo[None, :], mask=rmask[:, None], other=0.0)
            x_hi = tl.load(x_ptr + xrow[:, None] * K + (klo + 16)[None, :], mask=rmask[:, None], other=0.0)
            acc = acc + tl.dot(x_lo, tl.trans(lo.to(dt)), input_precision=PREC)
            acc = acc + tl.dot(x_hi, tl.trans(hi.to(dt)), input_precision=PREC)
        else:
            d, m = _group_scales(d_ptr, m_ptr, sc_ptr, mn_ptr, rows, k0, K, BK, KIND)              # [BN, G, 1]
            j = tl.arange(0, BK // 2)
            b = tl.reshape(tl.load(q_ptr + rows[:, None] * (K // 2) + (k0 // 2 + j)[None, :]).to(tl.int32),
                           (BN, BK // 32, 16))
            lo = tl.reshape(nibble_float(b & 15) * d + m, (BN, BK // 2))      # columns g*32 + i
            hi = tl.reshape(nibble_float(b >> 4) * d + m, (BN, BK // 2))      # columns g*32 + 16 + i
            klo = k0 + (j // 16) * 32 + j % 16
            x_lo = tl.load(x_ptr + xrow[:, None] * K + klo[None, :], mask=rmask[:, None], other=0.0)
            x_hi = tl.load(x_ptr + xrow[:, None] * K + (klo + 16)[None, :], mask=rmask[:, None], other=0.0)
            acc = acc + tl.dot(x_lo, tl.trans(lo.to(dt)), input_precision=PREC)
            acc = acc + tl.dot(x_hi, tl.trans(hi.to(dt)), input_precision=PREC)
        return acc

    @triton.jit
    def _linear_kernel(x_ptr, y_ptr, M, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, N: tl.constexpr, K: tl.constexpr,
                       KIND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
                       KSPLIT: tl.constexpr = 1):
        """y [M, N] = x W^T; with KSPLIT > 1, program (.., .., s) writes the fp32 partial sum over the s-th
        K / KSPLIT columns into y [KSPLIT, M, N] (_split_sum adds them)."""
        n = tl.program_id(0) * BN + tl.arange(0, BN)                      # output columns (rows of W)
        xrow = tl.program_id(1) * BM + tl.arange(0, BM)
        rmask = xrow < M
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        k_start = tl.program_id(2) * (K // KSPLIT)
        for k0 in range(k_start, k_start + K // KSPLIT, BK):
            acc = _dot_tile(acc, x_ptr, xrow, rmask, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n, k0, K, KIND, BN, BK,
                            PREC)
        out = y_ptr + tl.program_id(2) * M * N
        tl.store(out + xrow[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None])

    @triton.jit
    def _split_sum(part_ptr, y_ptr, MN, KSPLIT: tl.constexpr, B: tl.constexpr):
        """y [MN] = the sum of part [KSPLIT, MN] in fp32, in split order (deterministic), cast to y's dtype."""
        i = tl.program_id(0) * B + tl.arange(0, B)
        mask = i < MN
        acc = tl.zeros((B,), dtype=tl.float32)
        for s in range(KSPLIT):
            acc += tl.load(part_ptr + s * MN + i, mask=mask, other=0.0)
        tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _group_rows(bounds_ptr, order_ptr):
        """This program's slot and its rows [start, end) (bounds: [0, offs...])."""
        s = tl.load(order_ptr + tl.program_id(1))
        return s, tl.load(bounds_ptr + s), tl.load(bounds_ptr + s + 1)

    @triton.jit
    def slot_planes(q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, s, slot_bytes, KIND: tl.constexpr):
        """The plane pointers of slot s (slots are rows of slot_bytes bytes; d and m hold fp16, q5's qh in m's
        place int32)."""
        off = s.to(tl.int64) * slot_bytes
        if KIND == 5:
            m_ptr = m_ptr + off // 4
        else:
            m_ptr = m_ptr + off // 2
        return q_ptr + off, d_ptr + off // 2, m_ptr, sc_ptr + off, mn_ptr + off

    @triton.jit
    def _gate_up_kernel(x_ptr, h_ptr, bounds_ptr, order_ptr, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, slot_bytes,
                        I: tl.constexpr, K: tl.constexpr, KIND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, PREC: tl.constexpr):
        s, start, end = _group_rows(bounds_ptr, order_ptr)
        q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr = slot_planes(q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, s, slot_bytes, KIND)
        n = tl.program_id(0) * BN + tl.arange(0, BN)  # output columns; the slot's [2I, K] holds gate rows, then up
        dt = x_ptr.dtype.element_ty
        r0 = start
        while r0 < end:                               # (a while loop: Triton's interpreter takes no range here)
            xrow = r0 + tl.arange(0, BM)
            rmask = xrow < end
            r0 += BM
            g = tl.zeros((BM, BN), dtype=tl.float32)
            u = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                g = _dot_tile(g, x_ptr, xrow, rmask, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n, k0, K, KIND, BN, BK,
                              PREC)
                u = _dot_tile(u, x_ptr, xrow, rmask, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n + I, k0, K, KIND, BN,
                              BK, PREC)
            gr = g.to(dt).to(tl.float32)
            silu = (gr / (1.0 + tl.exp(-gr))).to(dt).to(tl.float32)
            h = (silu * u.to(dt).to(tl.float32)).to(dt)
            tl.store(h_ptr + xrow[:, None] * I + n[None, :], h, mask=rmask[:, None])

    @triton.jit
    def _down_kernel(h_ptr, y_ptr, bounds_ptr, order_ptr, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, slot_bytes,
                     N: tl.constexpr, K: tl.constexpr, KIND: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                     BK: tl.constexpr, PREC: tl.constexpr):
        s, start, end = _group_rows(bounds_ptr, order_ptr)
        q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr = slot_planes(q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, s, slot_bytes, KIND)
        n = tl.program_id(0) * BN + tl.arange(0, BN)
        r0 = start
        while r0 < end:
            xrow = r0 + tl.arange(0, BM)
            rmask = xrow < end
            r0 += BM
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for k0 in range(0, K, BK):
                acc = _dot_tile(acc, h_ptr, xrow, rmask, q_ptr, d_ptr, m_ptr, sc_ptr, mn_ptr, n, k0, K, KIND, BN,
                                BK, PREC)
            tl.store(y_ptr + xrow[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None])


def _block(n: int, want: int, least: int = 32) -> int:
    """The largest power of two <= want dividing n, at least `least` (32: one quantization group)."""
    b = want
    while b > least and n % b:
        b //= 2
    return b


def plane_pointers(slots: torch.Tensor, mat: Matrix) -> tuple[torch.Tensor, ...]:
    """Base pointers' tensors for the kernels: q, d, m, sc, mn of slot 0 (q5: its qh in m's place; a plane the kind
    lacks: q, unused)."""
    p = mat.planes(slots[:1])
    if mat.kind == "q5":
        p = p._replace(m=p.sc, sc=None)
    return tuple(p.q if t is None else t for t in p)


def active_order(offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (bounds [S + 1]: 0 then offs, the slots with rows first (stable) [S] int32), on the device."""
    bounds = torch.cat([offs.new_zeros(1), offs])                                            # [S + 1]
    return bounds, torch.argsort((bounds.diff() == 0).to(torch.int8), stable=True).to(torch.int32)


def triton_grouped_qffn(xs: torch.Tensor, offs: torch.Tensor, slots: torch.Tensor, lay: ExpertLayout,
                        bm: int | None = None, bn: int | None = None, bk: int | None = None,
                        warps: int = 4, stages: int = 3, grouping: tuple | None = None) -> torch.Tensor:
    """xs [N, Hd] (rows grouped by slot, group g ending at offs[g]), slots [S, nbytes] uint8 -> [N, Hd].
    bm, bn, bk: the tile (rows, output columns, reduction); by default chosen by N (decode or prefill); warps and
    stages: Triton's launch options; grouping: (bounds [S + 1], the slots with rows first [S]) as
    fused.group_by_expert gives them, when the caller has them (else found here from offs)."""
    N, Hd = xs.shape
    S, I = slots.shape[0], lay.w2.cols
    y = torch.empty(N, Hd, dtype=xs.dtype, device=xs.device)
    if N == 0:
        return y
    prec = "ieee" if xs.dtype == torch.float32 else "tf32"
    small = N <= 128                 # decode-sized; tiles measured best on the H200 (quant_h200/kernel_probe*.json)
    bm = bm or (16 if small else 128)
    bn, bk = bn or (32 if small else 64), bk or (128 if small else 64)
    bounds, order = grouping or active_order(offs)
    groups = min(N, S)
    h = torch.empty(N, I, dtype=xs.dtype, device=xs.device)
    bn1, bk1 = _block(I, bn), _block(Hd, bk)
    _gate_up_kernel[(I // bn1, groups)](xs, h, bounds, order, *plane_pointers(slots, lay.w13), slots.stride(0), I,
                                        Hd, KIND=lay.w13.code, BM=bm, BN=bn1, BK=bk1, PREC=prec, num_warps=warps,
                                        num_stages=stages)
    bn2 = _block(Hd, bn)
    _down_kernel[(Hd // bn2, groups)](h, y, bounds, order, *plane_pointers(slots, lay.w2), slots.stride(0), Hd, I,
                                      KIND=lay.w2.code, BM=bm, BN=bn2, BK=_block(I, bk), PREC=prec, num_warps=warps,
                                      num_stages=stages)
    return y


def torch_grouped_qffn(xs: torch.Tensor, offs: torch.Tensor, slots: torch.Tensor, lay: ExpertLayout,
                       grouping: tuple | None = None) -> torch.Tensor:
    """The reference: each active slot's expert dequantized, then the SiLU-gated FFN (synchronises: CPU only)."""
    ys = torch.zeros_like(xs)
    start = 0
    for s, end in enumerate(offs.tolist()):
        if end > start:
            w13, w2 = dequantize_expert(lay, slots[s], xs.dtype)
            ys[start:end] = gated_ffn(xs[start:end], w13, w2)
        start = end
    return ys


def grouped_qffn(xs: torch.Tensor, offs: torch.Tensor, slots: torch.Tensor, lay: ExpertLayout,
                 grouping: tuple | None = None) -> torch.Tensor:
    if xs.device.type == "cuda":
        if triton is None:
            raise RuntimeError("quantized experts on a GPU need Triton (pip install triton)")
        return triton_grouped_qffn(xs, offs, slots, lay, grouping=grouping)
    return torch_grouped_qffn(xs, offs, slots, lay)


def triton_linear(xs: torch.Tensor, planes: torch.Tensor, mat: Matrix) -> torch.Tensor:
    """xs [M, K] @ W^T -> [M, N] in xs's dtype, W [N, K] in planes [nbytes] (mat at offset 0, N % 16 == 0); fp32
    accumulation."""
    M, (N, K) = xs.shape[0], (mat.rows, mat.cols)
    y = torch.empty(M, N, dtype=xs.dtype, device=xs.device)
    if M == 0:
        return y
    small = M <= 128
    bn = _block(N, 32 if small else 64, least=16)         # output rows per program (N % 16 == 0)
    bm, bk = (16, _block(K, 128)) if small else (64, _block(K, 64))
    split = k_split(N // bn, K // bk, sm_count(xs.device)) if small else 1
    part = y if split == 1 else torch.empty(split, M, N, dtype=torch.float32, device=xs.device)    # [S, M, N]
    _linear_kernel[(N // bn, triton.cdiv(M, bm), split)](xs.contiguous(), part, M,
                                                        *plane_pointers(planes[None], mat), N, K, KIND=mat.code,
                                                        BM=bm, BN=bn, BK=bk, KSPLIT=split,
                                                        PREC="ieee" if xs.dtype == torch.float32 else "tf32")
    if split > 1:
        _split_sum[(triton.cdiv(M * N, 1024),)](part, y, M * N, KSPLIT=split, B=1024)
    return y


def k_split(programs: int, k_tiles: int, sms: int) -> int:
    """How many parts a decode-sized linear's K splits into: a power of two dividing the K tiles, each part at
    least two tiles, the programs at most 4 per SM. At one to sixteen rows a matrix of a few hundred output rows
    (V2-Lite's kv_a: 18 programs of 16 tiles each) otherwise runs its tiles one after another on a few SMs. It
    depends on the matrix and the GPU, not on the row count: a row's sum is the same in every batch."""
    split = 1
    while k_tiles % (2 * split) == 0 and k_tiles // (2 * split) >= 2 and programs * 2 * split <= 4 * sms:
        split *= 2
    return split


@functools.cache
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """The GPU's streaming multiprocessors (132 on the H200; the same figure for a CPU tensor in Triton's
    interpreter, so that tests split as the H200 does)."""
    return _sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 132


class QuantizedLinear:
    """x [..., K] -> x W^T [..., N] with W [N, K] kept in one matrix's planes (a GGUF file's attention projections
    or output head, while offloading): a Triton kernel that dequantizes in registers on a GPU (capturable); on a CPU
    device, where no GPU memory is saved, the matrix dequantized once (at its first call) through F.linear."""

    def __init__(self, planes: torch.Tensor, mat: Matrix):
        self.planes, self.mat = planes, mat                        # uint8 [mat.nbytes] on the compute device
        self.dense: torch.Tensor | None = None                     # CPU device: the dequantized matrix [N, K]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.reshape(-1, self.mat.cols)                                                 # [M, K]
        if xs.device.type == "cuda":
            if triton is None:
                raise RuntimeError("quantized weights on a GPU need Triton (pip install triton)")
            y = triton_linear(xs, self.planes, self.mat)
        else:
            if self.dense is None or self.dense.dtype != xs.dtype:
                self.dense = dequantize_matrix(self.planes, self.mat).to(xs.dtype)
            y = F.linear(xs, self.dense)
        return y.view(*x.shape[:-1], self.mat.rows)


class QuantizedFFN:
    """A gated FFN kept in quantized planes (a GGUF file's shared experts or dense MLP): x [..., Hd] -> [..., Hd]
    through the grouped kernel as one slot (its torch twin on a CPU device); capturable."""

    def __init__(self, planes: torch.Tensor, lay: ExpertLayout):
        self.slots, self.lay = planes[None], lay                   # [1, nbytes] on the compute device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.reshape(-1, x.shape[-1])                                                   # [N, Hd]
        offs = torch.full((1,), xs.shape[0], dtype=torch.int32, device=x.device)
        return grouped_qffn(xs, offs, self.slots, self.lay).view(x.shape)

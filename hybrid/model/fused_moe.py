"""The MoE layer's small operations at decode, one Triton kernel each: the router (fp32 logits, then softmax, greedy
top-k and the weights), the grouping of the picks by expert (a one-program counting sort) and the weighted combine
of the experts' outputs. Each has its torch twin, which CPU devices run (fused.on_triton decides)."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import fused
from .fused import triton

if triton is not None:
    import triton.language as tl

MAX_ORDER_PICKS = 128             # picks (tokens x top-k) the one-program sort takes; more go through torch
MAX_ORDER_EXPERTS = 128           # experts (or cache slots) it counts over ([E, E] in one program); more: torch


class Grouping(NamedTuple):
    """Routed picks grouped by expert: the rows to gather (token of each sorted pick) [N] int64, the group bounds
    [E + 1] int32 (0, then each expert's end), the experts with picks first (stable) [E] int32, and each pick's
    sorted position [T, K] int32."""
    rows: torch.Tensor
    bounds: torch.Tensor
    active: torch.Tensor
    rank: torch.Tensor


if triton is not None:
    @triton.jit
    def _logits_kernel(h_ptr, g_ptr, out_ptr, hs, Hd: tl.constexpr, E: tl.constexpr, EB: tl.constexpr,
                       BH: tl.constexpr):
        """Router logits of token program_id(0) for experts EB * program_id(1) + [0, EB), in fp32."""
        t = tl.program_id(0).to(tl.int64)
        e = tl.program_id(1) * EB + tl.arange(0, EB)
        em = e < E
        acc = tl.zeros((EB,), dtype=tl.float32)
        for k0 in range(0, Hd, BH):
            k = k0 + tl.arange(0, BH)
            km = k < Hd
            hv = tl.load(h_ptr + t * hs + k, mask=km, other=0.0).to(tl.float32)
            gv = tl.load(g_ptr + e[:, None] * Hd + k[None, :], mask=em[:, None] & km[None, :], other=0.0)
            acc += tl.sum(gv.to(tl.float32) * hv[None, :], axis=1)
        tl.store(out_ptr + t * E + e, acc, mask=em)

    @triton.jit
    def _topk_kernel(l_ptr, idx_ptr, w_ptr, scale, E: tl.constexpr, EP: tl.constexpr, K: tl.constexpr,
                     KP: tl.constexpr, NORM: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, EP)
        em = e < E
        acc = tl.load(l_ptr + t * E + e, mask=em, other=0.0)
        logits = tl.where(em, acc, float("-inf"))
        p = tl.exp(logits - tl.max(logits, axis=0))
        p = p / tl.sum(p, axis=0)                                                        # softmax [EP]
        j = tl.arange(0, KP)
        top_w = tl.zeros((KP,), dtype=tl.float32)
        top_i = tl.zeros((KP,), dtype=tl.int32)
        for s in tl.static_range(K):                                                      # greedy top-k
            best = tl.max(p, axis=0)
            i = tl.min(tl.where(p == best, e, EP), axis=0)
            top_w = tl.where(j == s, best, top_w)
            top_i = tl.where(j == s, i, top_i)
            p = tl.where(e == i, -1.0, p)
        if NORM:
            top_w = top_w / (tl.sum(top_w, axis=0) + 1e-20)
        else:
            top_w = top_w * scale
        tl.store(idx_ptr + t * K + j, top_i.to(tl.int64), mask=j < K)
        tl.store(w_ptr + t * K + j, top_w, mask=j < K)

    @triton.jit
    def _order_kernel(idx_ptr, rows_ptr, bounds_ptr, active_ptr, rank_ptr, N, K: tl.constexpr, E: tl.constexpr,
                      NP: tl.constexpr, EP: tl.constexpr):
        i = tl.arange(0, NP)
        im = i < N
        e = tl.load(idx_ptr + i, mask=im, other=E).to(tl.int32)                          # padding sorts last
        ei, ej = e[:, None], e[None, :]
        before = (ej < ei) | ((ej == ei) & (i[None, :] < i[:, None]))                   # [NP, NP]
        rank = tl.sum(before.to(tl.int32), axis=1)                                       # stable sort position
        tl.store(rank_ptr + i, rank, mask=im)
        tl.store(rows_ptr + rank, (i // K).to(tl.int64), mask=im)
        s = tl.arange(0, EP)
        sm = s < E
        ends = tl.sum(((ej <= s[:, None]) & im[None, :]).to(tl.int32), axis=1)          # [EP]
        tl.store(bounds_ptr + 1 + s, ends, mask=sm)
        tl.store(bounds_ptr + s, tl.zeros((EP,), dtype=tl.int32), mask=s == 0)
        act = (tl.sum((ej == s[:, None]).to(tl.int32), axis=1) > 0) & sm                 # [EP]
        lower = s[None, :] < s[:, None]
        act_before = tl.sum((act[None, :] & lower).to(tl.int32), axis=1)
        idle_before = tl.sum(((act[None, :] == 0) & lower & sm[None, :]).to(tl.int32), axis=1)
        pos = tl.where(act, act_before, tl.sum(act.to(tl.int32), axis=0) + idle_before)
        tl.store(active_ptr + pos, s, mask=sm)

    @triton.jit
    def _combine_kernel(y_ptr, rank_ptr, w_ptr, out_ptr, Hd: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < Hd
        dt = out_ptr.dtype.element_ty
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(K):
            r = tl.load(rank_ptr + t * K + k).to(tl.int64)
            wk = tl.load(w_ptr + t * K + k)
            y = tl.load(y_ptr + r * Hd + c, mask=m, other=0.0).to(tl.float32)
            acc = (acc + (y * wk).to(dt).to(tl.float32)).to(dt).to(tl.float32)
        tl.store(out_ptr + t * Hd + c, acc.to(dt), mask=m)


def route_topk(h: torch.Tensor, gate: torch.Tensor, k: int, norm: bool,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy softmax routing: h [T, Hd], gate [E, Hd] fp32 -> (idx [T, k] int64, weights [T, k] fp32): the top-k
    softmax probabilities, normalised to sum 1 if `norm`, else times `scale`."""
    if not fused.on_triton(h):
        w, idx = F.linear(h.float(), gate).softmax(dim=-1).topk(k, dim=-1, sorted=False)
        return idx, (w / (w.sum(-1, keepdim=True) + 1e-20) if norm else w * scale)
    T, (E, Hd) = h.shape[0], gate.shape
    logits = torch.empty(T, E, dtype=torch.float32, device=h.device)
    idx = torch.empty(T, k, dtype=torch.int64, device=h.device)
    w = torch.empty(T, k, dtype=torch.float32, device=h.device)
    if T > 16:                        # a prefill: one GEMM
        logits = F.linear(h.float(), gate)
    elif T:                           # decode: a program per (token, expert): one row of the gate each
        _logits_kernel[(T, E)](h, gate, logits, h.stride(0), Hd=Hd, E=E, EB=1,
                               BH=min(4096, triton.next_power_of_2(Hd)), num_warps=4)
    if T:                             # then one program per token picks
        _topk_kernel[(T,)](logits, idx, w, scale, E=E, EP=triton.next_power_of_2(E), K=k,
                           KP=triton.next_power_of_2(k), NORM=norm, num_warps=1)
    return idx, w


def group_by_expert(idx: torch.Tensor, E: int) -> Grouping:
    """idx [T, K] routed picks -> their Grouping over E experts (stable: picks of one expert keep token order)."""
    T, K = idx.shape
    N = T * K
    if not fused.on_triton(idx) or N > MAX_ORDER_PICKS or E > MAX_ORDER_EXPERTS:
        flat = idx.reshape(-1)                                                            # [N]
        order = torch.argsort(flat, stable=True)                                          # [N]
        counts = torch.zeros(E, dtype=torch.int64, device=idx.device).scatter_add_(0, flat, torch.ones_like(flat))
        bounds = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)       # [E + 1]
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(N, device=idx.device))
        active = torch.argsort((counts == 0).to(torch.int8), stable=True).to(torch.int32)
        return Grouping(order // K, bounds, active, rank.view(T, K).to(torch.int32))
    rows = torch.empty(N, dtype=torch.int64, device=idx.device)
    bounds = torch.empty(E + 1, dtype=torch.int32, device=idx.device)
    active = torch.empty(E, dtype=torch.int32, device=idx.device)
    rank = torch.empty(T, K, dtype=torch.int32, device=idx.device)
    _order_kernel[(1,)](idx, rows, bounds, active, rank, N, K=K, E=E, NP=max(16, triton.next_power_of_2(N)),
                        EP=triton.next_power_of_2(E), num_warps=8)
    return Grouping(rows, bounds, active, rank)


def combine(y: torch.Tensor, rank: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y [N, Hd] expert outputs in sorted order, rank/w [T, K] -> sum_k w[t, k] * y[rank[t, k]] [T, Hd], each
    product and partial sum rounded to y's dtype."""
    T, K = rank.shape
    Hd = y.shape[1]
    if not fused.on_triton(y):
        parts = (y[rank.long()] * w[..., None]).to(y.dtype)                                  # [T, K, Hd]
        out = torch.zeros(T, Hd, dtype=y.dtype, device=y.device)
        for k in range(K):
            out = out + parts[:, k]
        return out
    out = torch.empty(T, Hd, dtype=y.dtype, device=y.device)
    if T:
        _combine_kernel[(T, triton.cdiv(Hd, 1024))](y, rank, w, out, Hd=Hd, K=K, BLOCK=1024, num_warps=4)
    return out

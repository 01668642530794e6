"""The decode step's small operations fused into one kernel each: residual add with RMSNorm, attention's input
(the latent's norm, rope on q and k, the cache write), SiLU times up, the router (logits, softmax, greedy top-k,
weights), the experts' grouping (a counting sort of the picks) and the weighted combine of their outputs.

At decode sizes each of these is a few microseconds of launches in torch (casts, reductions, sorts, scatters): one
Triton kernel each takes a step from ~70 to ~40 kernels per layer. Every kernel rounds to the compute dtype where
the torch twin beside it rounds, and accumulates in fp32; the twins run on CPU devices (and in tests, against the
kernels run in Triton's interpreter). Only reduction order differs."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .rope import Rope

try:
    import triton
    import triton.language as tl
except ImportError:               # CPU-only installs: the torch twins serve them
    triton = None

MAX_ORDER_PICKS = 128             # picks (tokens x top-k) the one-program sort takes; more go through torch


def on_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and triton is not None


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
    def _add_norm_kernel(x_ptr, d_ptr, w_ptr, s_ptr, h_ptr, xs, ds, ss, hs, eps, N: tl.constexpr,
                         BLOCK: tl.constexpr, ADD: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        m = c < N
        x = tl.load(x_ptr + r * xs + c, mask=m, other=0.0)
        dt = x.dtype
        if ADD:
            x = (x.to(tl.float32) + tl.load(d_ptr + r * ds + c, mask=m, other=0.0).to(tl.float32)).to(dt)
            tl.store(s_ptr + r * ss + c, x, mask=m)
        xf = x.to(tl.float32)
        y = (xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)).to(dt)
        w = tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
        tl.store(h_ptr + r * hs + c, (w * y.to(tl.float32)).to(dt), mask=m)

    @triton.jit
    def _rope_pairs(src, dst, cos, sin, mask):
        """The (even, odd) pairs at src, src + 1 times (cos + i sin), stored at dst, dst + 1 (may be src)."""
        e = tl.load(src, mask=mask, other=0.0)
        o = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
        ef = e.to(tl.float32)
        tl.store(dst, (ef * cos - o * sin).to(e.dtype), mask=mask)
        tl.store(dst + 1, (ef * sin + o * cos).to(e.dtype), mask=mask)

    @triton.jit
    def _mla_prep_kernel(q_ptr, kv_ptr, rot_ptr, w_ptr, c_ptr, pe_ptr, base_ptr, base, T, eps, c_sb, c_ss, pe_sb,
                         pe_ss, H: tl.constexpr, HP: tl.constexpr, DQ: tl.constexpr, DN: tl.constexpr,
                         C: tl.constexpr, CP: tl.constexpr, R: tl.constexpr, BASE_PTR: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)                                               # b * T + t
        b, t = tok // T, tok % T
        if BASE_PTR:
            pos = tl.load(base_ptr) + t
        else:
            pos = base + t
        kv = kv_ptr + tok * (C + R)
        j = tl.arange(0, R // 2)
        cos, sin = tl.load(rot_ptr + tok * R + 2 * j), tl.load(rot_ptr + tok * R + 2 * j + 1)
        _rope_pairs(kv + C + 2 * j, pe_ptr + b * pe_sb + pos * pe_ss + 2 * j, cos, sin, j < R // 2)
        c = tl.arange(0, CP)
        cm = c < C
        lat = tl.load(kv + c, mask=cm, other=0.0)
        lf = lat.to(tl.float32)
        y = (lf * tl.rsqrt(tl.sum(lf * lf, axis=0) / C + eps)).to(lat.dtype).to(tl.float32)
        w = tl.load(w_ptr + c, mask=cm, other=0.0).to(tl.float32)
        tl.store(c_ptr + b * c_sb + pos * c_ss + c, (w * y).to(lat.dtype), mask=cm)
        h = tl.arange(0, HP)
        qp = q_ptr + tok * H * DQ + h[:, None] * DQ + DN + 2 * j[None, :]                    # [HP, R/2]
        _rope_pairs(qp, qp, cos[None, :], sin[None, :], (h < H)[:, None])

    @triton.jit
    def _decode_attn_kernel(ql_ptr, qp_ptr, kc_ptr, kp_ptr, mask_ptr, o_ptr, ws_m, ws_l, ws_o, scale, S, CHUNK,
                            ql_sb, ql_sh, qp_sb, qp_sh, kc_sb, kc_ss, kp_sb, kp_ss, m_sb, H: tl.constexpr,
                            HP: tl.constexpr, C: tl.constexpr, R: tl.constexpr, BS: tl.constexpr,
                            SPLIT: tl.constexpr, PREC: tl.constexpr):
        b, sp = tl.program_id(0).to(tl.int64), tl.program_id(1)
        h, c, r = tl.arange(0, HP), tl.arange(0, C), tl.arange(0, R)
        hm = (h < H)[:, None]
        ql = tl.load(ql_ptr + b * ql_sb + h[:, None] * ql_sh + c[None, :], mask=hm, other=0.0)       # [HP, C]
        qp = tl.load(qp_ptr + b * qp_sb + h[:, None] * qp_sh + r[None, :], mask=hm, other=0.0)       # [HP, R]
        m = tl.full((HP,), -1e30, tl.float32)
        s_sum = tl.zeros((HP,), dtype=tl.float32)
        acc = tl.zeros((HP, C), dtype=tl.float32)
        s0 = sp * CHUNK
        end = tl.minimum(s0 + CHUNK, S)
        while s0 < end:                                    # (a while loop: Triton's interpreter takes no range here)
            si = s0 + tl.arange(0, BS)
            sm = si < end
            s0 += BS
            bias = tl.load(mask_ptr + b * m_sb + si, mask=sm, other=-1e30)                           # [BS]
            if tl.max(bias, axis=0) > -1e29:                       # a block of padding or future slots: skipped
                kc = tl.load(kc_ptr + b * kc_sb + si[:, None] * kc_ss + c[None, :], mask=sm[:, None], other=0.0)
                kp = tl.load(kp_ptr + b * kp_sb + si[:, None] * kp_ss + r[None, :], mask=sm[:, None], other=0.0)
                sc = tl.dot(ql, tl.trans(kc), input_precision=PREC) + tl.dot(qp, tl.trans(kp), input_precision=PREC)
                sc = sc * scale + bias[None, :]                                                      # [HP, BS]
                m_new = tl.maximum(m, tl.max(sc, axis=1))
                alpha = tl.exp(m - m_new)
                p = tl.exp(sc - m_new[:, None])
                s_sum = s_sum * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(kc.dtype), kc, input_precision=PREC)
                m = m_new
        if SPLIT:                                          # partial results, merged by _merge_kernel
            w = b * tl.num_programs(1) + sp
            tl.store(ws_m + w * HP + h, m)
            tl.store(ws_l + w * HP + h, s_sum)
            tl.store(ws_o + (w * HP + h[:, None]) * C + c[None, :], acc)
        else:                                              # o [H, B, C]
            out = acc / s_sum[:, None]
            tl.store(o_ptr + (h[:, None] * tl.num_programs(0) + b) * C + c[None, :], out.to(o_ptr.dtype.element_ty),
                     mask=hm)

    @triton.jit
    def _merge_kernel(ws_m, ws_l, ws_o, o_ptr, B, NS, NSP: tl.constexpr, HP: tl.constexpr, C: tl.constexpr,
                      BC: tl.constexpr):
        b, h = tl.program_id(0).to(tl.int64), tl.program_id(1)
        c, sp = tl.program_id(2) * BC + tl.arange(0, BC), tl.arange(0, NSP)
        spm = sp < NS
        m = tl.load(ws_m + (b * NS + sp) * HP + h, mask=spm, other=-1e30)                          # [NSP]
        scale = tl.exp(m - tl.max(m, axis=0))
        s_sum = tl.sum(tl.load(ws_l + (b * NS + sp) * HP + h, mask=spm, other=0.0) * scale, axis=0)
        acc = tl.load(ws_o + ((b * NS + sp[:, None]) * HP + h) * C + c[None, :], mask=spm[:, None], other=0.0)
        out = tl.sum(acc * scale[:, None], axis=0) / s_sum
        tl.store(o_ptr + (h * B + b) * C + c, out.to(o_ptr.dtype.element_ty))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, gs, os, I: tl.constexpr, BLOCK: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < I
        g = tl.load(gu_ptr + r * gs + c, mask=m, other=0.0)
        u = tl.load(gu_ptr + r * gs + I + c, mask=m, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32)
        tl.store(out_ptr + r * os + c, (s * u).to(g.dtype), mask=m)

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


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D matrix of rows (a view where the layout allows, else a copy), unit stride along a row."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def add_rms_norm(x: torch.Tensor, d: torch.Tensor | None, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (s = x + d (or x when d is None), weight * rms_norm(s)), both in x's dtype, any leading shape."""
    if not on_triton(x):
        s = x if d is None else x + d
        return s, weight * F.rms_norm(s.float(), (s.shape[-1],), eps=eps).to(s.dtype)
    x2, Hd = _rows(x), x.shape[-1]
    d2 = x2 if d is None else _rows(d)
    s = x if d is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s2 = x2 if d is None else s.view(-1, Hd)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _add_norm_kernel[(x2.shape[0],)](x2, d2, weight, s2, h, x2.stride(0), d2.stride(0), s2.stride(0), Hd, eps,
                                         N=Hd, BLOCK=triton.next_power_of_2(Hd), ADD=d is not None, num_warps=4)
    return s, h


def mla_prep(q: torch.Tensor, kv: torch.Tensor, rot: torch.Tensor, norm_w: torch.Tensor, eps: float,
             c_cache: torch.Tensor, pe_cache: torch.Tensor, start: int,
             write_index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention's input for T new tokens: q [B, T, H, Dn + R] gets rope on its last R (in place on a GPU), kv
    [B, T, C + R] is the latent and the key's rope part; the normalised latent and the roped key go to the layer's
    cache c_cache [B, S, C], pe_cache [B, S, R] at slots start.. (or write_index[0].. when given, a graph's).
    rot [B, T, R/2] complex. -> (q_nope [B, T, H, Dn], q_pe [B, T, H, R])."""
    (B, T, H, DQ), (C, R) = q.shape, (c_cache.shape[-1], pe_cache.shape[-1])
    flat = q.is_contiguous() and kv.is_contiguous() and c_cache.stride(-1) == pe_cache.stride(-1) == 1
    if not (on_triton(q) and flat):
        q_pe = Rope.apply(q[..., DQ - R:], rot)
        c, k_pe = kv.split([C, R], dim=-1)
        c, k_pe = add_rms_norm(c, None, norm_w, eps)[1], Rope.apply(k_pe, rot)                 # [B, T, C], [B, T, R]
        if write_index is None:
            c_cache[:, start:start + T] = c
            pe_cache[:, start:start + T] = k_pe
        else:
            c_cache.index_copy_(1, write_index, c)
            pe_cache.index_copy_(1, write_index, k_pe)
        return q[..., :DQ - R], q_pe
    if B * T:
        rr = torch.view_as_real(rot).reshape(B * T, R)                                            # [BT, R] fp32
        base = write_index if write_index is not None else kv
        _mla_prep_kernel[(B * T,)](q, kv, rr, norm_w, c_cache, pe_cache, base, start, T, eps, c_cache.stride(0),
                                   c_cache.stride(1), pe_cache.stride(0), pe_cache.stride(1), H=H,
                                   HP=triton.next_power_of_2(H), DQ=DQ, DN=DQ - R, C=C,
                                   CP=triton.next_power_of_2(C), R=R, BASE_PTR=write_index is not None,
                                   num_warps=4)
    return q[..., :DQ - R], q[..., DQ - R:]


def decode_attends(q_lat: torch.Tensor, q_pe: torch.Tensor) -> bool:
    """Does decode_attention take this query (one new token per sequence on a GPU, dims the kernel tiles)?"""
    dims = q_lat.shape[-1], q_pe.shape[-1]
    return on_triton(q_lat) and q_lat.shape[2] == 1 and all(d >= 16 and d & (d - 1) == 0 for d in dims)


def decode_attention(q_lat: torch.Tensor, q_pe: torch.Tensor, kc: torch.Tensor, kpe: torch.Tensor,
                     mask: torch.Tensor, scale: float, chunk: int | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over the latent cache, flash-decoding style: q_lat [B, H, 1, C],
    q_pe [B, H, 1, R], kc [B, S, C], kpe [B, S, R], mask [B, 1, 1, S] additive -> o_lat [B, H, 1, C] (a view of
    [H, B, C] storage). Each sequence is cut in chunks of `chunk` slots (by default at most 64 chunks of a
    multiple of 32), one program each, merged after; blocks of masked slots (padding, the unwritten rest of a
    graph's capacity) are skipped, so the work follows the written length."""
    B, H, _, C = q_lat.shape
    S, R, BS = kc.shape[1], kpe.shape[-1], 32
    blocks = triton.cdiv(S, BS)
    chunk = chunk or BS * triton.cdiv(blocks, min(64, blocks))
    HP, ns = max(16, triton.next_power_of_2(H)), triton.cdiv(S, chunk)
    o = torch.empty(H, B, C, dtype=q_lat.dtype, device=q_lat.device)
    split = ns > 1
    ws = [torch.empty(B * ns * HP * n, dtype=torch.float32, device=q_lat.device) for n in (1, 1, C)] if split \
        else [o, o, o]
    prec = "ieee" if q_lat.dtype == torch.float32 else "tf32"
    _decode_attn_kernel[(B, ns)](q_lat, q_pe, kc, kpe, mask, o, *ws, scale, S, chunk, q_lat.stride(0),
                                 q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), kc.stride(0), kc.stride(1),
                                 kpe.stride(0), kpe.stride(1), mask.stride(0), H=H, HP=HP, C=C, R=R, BS=BS,
                                 SPLIT=split, PREC=prec, num_warps=8)
    if split:
        bc = min(C, 128)
        _merge_kernel[(B, H, C // bc)](*ws, o, B, ns, NSP=triton.next_power_of_2(ns), HP=HP, C=C, BC=bc,
                                       num_warps=4)
    return o.permute(1, 0, 2).unsqueeze(2)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [N, 2I] (gate columns, then up) -> silu(gate) * up [N, I]."""
    if not on_triton(gu):
        g, u = gu.chunk(2, dim=-1)
        return F.silu(g) * u
    gu2 = _rows(gu)
    N, I = gu2.shape[0], gu2.shape[1] // 2
    out = torch.empty(N, I, dtype=gu.dtype, device=gu.device)
    if N:
        _silu_mul_kernel[(N, triton.cdiv(I, 1024))](gu2, out, gu2.stride(0), I, I=I, BLOCK=1024, num_warps=4)
    return out.view(*gu.shape[:-1], I)


def route_topk(h: torch.Tensor, gate: torch.Tensor, k: int, norm: bool,
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy softmax routing: h [T, Hd], gate [E, Hd] fp32 -> (idx [T, k] int64, weights [T, k] fp32): the top-k
    softmax probabilities, normalised to sum 1 if `norm`, else times `scale`."""
    if not on_triton(h):
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
    if not on_triton(idx) or N > MAX_ORDER_PICKS:
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
    if not on_triton(y):
        parts = (y[rank.long()] * w[..., None]).to(y.dtype)                                  # [T, K, Hd]
        out = torch.zeros(T, Hd, dtype=y.dtype, device=y.device)
        for k in range(K):
            out = out + parts[:, k]
        return out
    out = torch.empty(T, Hd, dtype=y.dtype, device=y.device)
    if T:
        _combine_kernel[(T, triton.cdiv(Hd, 1024))](y, rank, w, out, Hd=Hd, K=K, BLOCK=1024, num_warps=4)
    return out

"""The decode step's small operations fused into one kernel each: residual add with RMSNorm, attention's input
(the latent's norm, rope on q and k, the cache write) and SiLU times up; decode_attention.py and fused_moe.py hold
the step's other kernels.

At decode sizes each of these is a few microseconds of launches in torch (casts, reductions, copies): one Triton
kernel each. Every kernel rounds to the compute dtype where the torch twin beside it rounds, and accumulates in
fp32; the twins run on CPU devices (and in tests, against the kernels run in Triton's interpreter). Only reduction
order differs."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .rope import Rope

try:
    import triton
    import triton.language as tl
except ImportError:               # CPU-only installs: the torch twins serve them
    triton = None


def on_triton(t: torch.Tensor) -> bool:
    """Whether the fused kernels take t (a CUDA tensor, Triton installed): the one switch of fused.py,
    decode_attention.py and fused_moe.py."""
    return t.is_cuda and triton is not None


if triton is not None:
    @triton.jit
    def _add_norm_kernel(x_ptr, d_ptr, e_ptr, w_ptr, s_ptr, h_ptr, xs, ds, es, ss, hs, eps, N: tl.constexpr,
                         BLOCK: tl.constexpr, ADD: tl.constexpr, ADD2: tl.constexpr):
        r = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK)
        m = c < N
        x = tl.load(x_ptr + r * xs + c, mask=m, other=0.0)
        dt = x.dtype
        if ADD:
            d = tl.load(d_ptr + r * ds + c, mask=m, other=0.0)
            if ADD2:                                    # d + e first, rounded, as (routed + shared) is
                d = (d.to(tl.float32) + tl.load(e_ptr + r * es + c, mask=m, other=0.0).to(tl.float32)).to(dt)
            x = (x.to(tl.float32) + d.to(tl.float32)).to(dt)
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
    def _mla_prep_kernel(q_ptr, kv_ptr, rot_ptr, w_ptr, c_ptr, pe_ptr, base_ptr, base, T, eps, q_st, kv_st, c_sb,
                         c_ss, pe_sb, pe_ss, H: tl.constexpr, HP: tl.constexpr, DQ: tl.constexpr, DN: tl.constexpr,
                         C: tl.constexpr, CP: tl.constexpr, R: tl.constexpr, BASE_PTR: tl.constexpr):
        tok = tl.program_id(0).to(tl.int64)                                               # b * T + t
        b, t = tok // T, tok % T
        if BASE_PTR:
            pos = tl.load(base_ptr) + t
        else:
            pos = base + t
        kv = kv_ptr + tok * kv_st
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
        qp = q_ptr + tok * q_st + h[:, None] * DQ + DN + 2 * j[None, :]                      # [HP, R/2]
        _rope_pairs(qp, qp, cos[None, :], sin[None, :], (h < H)[:, None])

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


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D matrix of rows (a view where the layout allows, else a copy), unit stride along a row."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def add_rms_norm(x: torch.Tensor, d: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 d2: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (s = x + d, or x + (d + d2), or x when d is None; weight * rms_norm(s)), in x's dtype, any leading
    shape."""
    if not on_triton(x):
        s = x if d is None else x + (d if d2 is None else d + d2)
        return s, weight * F.rms_norm(s.float(), (s.shape[-1],), eps=eps).to(s.dtype)
    x2, Hd = _rows(x), x.shape[-1]
    dd = x2 if d is None else _rows(d)
    ee = dd if d2 is None else _rows(d2)
    s = x if d is None else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s2 = x2 if d is None else s.view(-1, Hd)
    h = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _add_norm_kernel[(x2.shape[0],)](x2, dd, ee, weight, s2, h, x2.stride(0), dd.stride(0), ee.stride(0),
                                         s2.stride(0), Hd, eps, N=Hd, BLOCK=triton.next_power_of_2(Hd),
                                         ADD=d is not None, ADD2=d2 is not None, num_warps=4)
    return s, h


def mla_prep(q: torch.Tensor, kv: torch.Tensor, rot: torch.Tensor, norm_w: torch.Tensor, eps: float,
             c_cache: torch.Tensor, pe_cache: torch.Tensor, start: int,
             write_index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention's input for T new tokens: q [B, T, H, Dn + R] gets rope on its last R (in place on a GPU), kv
    [B, T, C + R] is the latent and the key's rope part; the normalised latent and the roped key go to the layer's
    cache c_cache [B, S, C], pe_cache [B, S, R] at slots start.. (or write_index[0].. when given, a graph's).
    rot [B, T, R/2] complex. -> (q_nope [B, T, H, Dn], q_pe [B, T, H, R])."""
    (B, T, H, DQ), (C, R) = q.shape, (c_cache.shape[-1], pe_cache.shape[-1])
    rows = (q.stride(3) == 1 and q.stride(2) == DQ and q.stride(0) == T * q.stride(1) and kv.stride(2) == 1
            and kv.stride(0) == T * kv.stride(1) and c_cache.stride(-1) == pe_cache.stride(-1) == 1)
    if not (on_triton(q) and rows):                 # (the kernel needs each token's q and kv at a fixed stride)
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
        _mla_prep_kernel[(B * T,)](q, kv, rr, norm_w, c_cache, pe_cache, base, start, T, eps, q.stride(1),
                                   kv.stride(1), c_cache.stride(0), c_cache.stride(1), pe_cache.stride(0),
                                   pe_cache.stride(1), H=H,
                                   HP=triton.next_power_of_2(H), DQ=DQ, DN=DQ - R, C=C,
                                   CP=triton.next_power_of_2(C), R=R, BASE_PTR=write_index is not None,
                                   num_warps=4)
    return q[..., :DQ - R], q[..., DQ - R:]


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

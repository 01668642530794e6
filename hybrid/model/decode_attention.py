"""Attention of one new token per sequence over MLA's latent cache, flash-decoding style, as one Triton kernel (and
a merge of the chunks): the decode step's attention. Prefills and CPU devices go through deepseek.MLAttention's
torch path."""
from __future__ import annotations

import torch

from . import fused
from .fused import triton

if triton is not None:
    import triton.language as tl

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


def decode_attends(q_lat: torch.Tensor, q_pe: torch.Tensor) -> bool:
    """Does decode_attention take this query (one new token per sequence on a GPU, dims the kernel tiles)?"""
    dims = q_lat.shape[-1], q_pe.shape[-1]
    return fused.on_triton(q_lat) and q_lat.shape[2] == 1 and all(d >= 16 and d & (d - 1) == 0 for d in dims)


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

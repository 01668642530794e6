"""llama.cpp's block formats for one matrix's rows: encoders (Q4_K and Q5_0, round to nearest) and the exact moves
of Q8_0, Q5_0, Q4_0 and Q4_K blocks into quant.py's planes.

Blocks as ggml lays them out, per row of C weights (little-endian):
- Q8_0, 32 weights in 34 bytes: fp16 d, int8 q[32]; w = d q.
- Q4_0, 32 in 18: fp16 d, 16 bytes (q[i] low nibble, q[i + 16] high); w = d (q - 8).
- Q5_0, 32 in 22: fp16 d, uint32 qh (bit i: q[i]'s fifth bit), 16 bytes of low nibbles as Q4_0; w = d (q - 16).
- Q4_K, 256 in 144: fp16 d, fp16 dmin, 12 bytes of 6-bit scales sc[8] and mins mn[8], 128 bytes: each 32 holds a
  pair of sub-blocks (q of sub-block 2j in the low nibbles, of 2j + 1 in the high ones);
  w = d sc[j] q - dmin mn[j] for sub-block j.
- Q6_K, 256 in 210: ql[128] (low 4 bits), qh[64] (high 2 bits), int8 scales[16], fp16 d; each half of 128 weights
  takes 64 ql bytes (weights 0-31 / 64-95 of the half in their low / high nibbles, 32-63 / 96-127 in those of the
  next 32 bytes) and 32 qh bytes (bits 2i..2i+1 of byte l: weight l + 32 i); w = d scales[j // 16] (q - 32).
Moves change no value: Q5_0's nibbles, fifth bits and d move as they are into q5 (or, beside Q8_0 in one tensor,
its q - 16 widen to int8 in q8), Q8_0's q are int8, Q4_0 is the q4 plane with the min -8d, Q4_K's nibbles
are reordered into the q4 plane's order and its two levels of scales kept as they are (quant.py's q4k), Q6_K's
q - 32 widen to int8 beside its d and scales (quant.py's q6k)."""
from __future__ import annotations

import numpy as np

BLOCK_BYTES = {"Q8_0": 34, "Q4_0": 18, "Q5_0": 22, "Q4_K": 144, "Q6_K": 210}


def _blocks(raw: np.ndarray, kind: str) -> np.ndarray:
    """Rows of raw blocks [R, row bytes] -> [R, blocks, block bytes] (uint8)."""
    raw = np.ascontiguousarray(raw).view(np.uint8)
    return raw.reshape(raw.shape[0], -1, BLOCK_BYTES[kind])


def _fp16(b: np.ndarray) -> np.ndarray:
    """[..., 2] bytes -> [...] fp16."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """q [..., 32] in 0..15 -> [..., 16] bytes: q[i] low, q[i + 16] high (ggml's order within 32)."""
    return (q[..., :16] | (q[..., 16:] << 4)).astype(np.uint8)


def _unpack_nibbles(b: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> q [..., 32] (uint8)."""
    return np.concatenate([b & 15, b >> 4], axis=-1)


def q8_planes(raw: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 or Q5_0 rows [R, row bytes] -> (q int8 [R, C], d fp16 [R, C/32]), the same values."""
    b = _blocks(raw, kind)
    R, d = b.shape[0], _fp16(b[..., :2])                                              # [R, G]
    if kind == "Q8_0":
        return np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(R, -1), d
    high = np.unpackbits(b[..., 2:6], axis=-1, bitorder="little")                    # [R, G, 32]: bit i of qh
    q = _unpack_nibbles(b[..., 6:]) | (high << 4)                                    # [R, G, 32] in 0..31
    q -= 16
    return q.view(np.int8).reshape(R, -1), d


def q5_planes(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q5_0 rows -> (nibbles [R, C/2], d fp16 [R, C/32], qh int32 [R, C/32]), the blocks' own bytes."""
    b = _blocks(raw, "Q5_0")
    R = b.shape[0]
    qh = np.ascontiguousarray(b[..., 2:6]).view(np.int32)[..., 0]                      # [R, G]
    return np.ascontiguousarray(b[..., 6:]).reshape(R, -1), _fp16(b[..., :2]), qh


def q4_planes(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_0 rows -> (nibbles [R, C/2], d, m = -8 d fp16 [R, C/32])."""
    b = _blocks(raw, "Q4_0")
    d = _fp16(b[..., :2])
    return np.ascontiguousarray(b[..., 2:]).reshape(b.shape[0], -1), d, (d * np.float16(-8)).astype(np.float16)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 scale bytes [..., 12] -> (sc, mn) [..., 8], 6 bits each."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], axis=-1)
    mn = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return sc, mn


def q4k_planes(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    """Q4_K rows -> (nibbles [R, C/2] in the q4 order, d, dmin fp16 [R, C/256], sc, mn uint8 [R, C/32])."""
    b = _blocks(raw, "Q4_K")
    R, S = b.shape[:2]
    sc, mn = _k_scales(b[..., 4:16])                                                  # [R, S, 8]
    pairs = b[..., 16:].reshape(R, S, 4, 32)        # low nibbles: sub-block 2j's q, high: 2j + 1's
    lo, hi = pairs[..., :16], pairs[..., 16:]
    q = np.stack([(lo & 15) | (hi << 4), (lo >> 4) | (hi & 0xF0)], axis=3)           # [R, S, 4, 2, 16]
    return q.reshape(R, -1), _fp16(b[..., 0:2]), _fp16(b[..., 2:4]), sc.reshape(R, -1), mn.reshape(R, -1)


def q6k_planes(raw: np.ndarray) -> tuple[np.ndarray, ...]:
    """Q6_K rows -> (q - 32 int8 [R, C], d fp16 [R, C/256], scales int8 [R, C/16])."""
    b = _blocks(raw, "Q6_K")
    R, S = b.shape[:2]
    ql = b[..., :128].reshape(R, S, 2, 64)
    qh = b[..., 128:192].reshape(R, S, 2, 32)
    low = np.concatenate([ql[..., :32] & 15, ql[..., 32:] & 15, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=-1)
    high = np.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)              # [R, S, 2, 128]
    q = (low | (high << 4)).astype(np.int16) - 32
    sc = np.ascontiguousarray(b[..., 192:208]).view(np.int8)                          # [R, S, 16]
    return q.astype(np.int8).reshape(R, -1), _fp16(b[..., 208:210]), sc.reshape(R, -1)


def planes(raw: np.ndarray, block_type: str, kind: str) -> tuple[np.ndarray, ...]:
    """Rows of blocks of one of BLOCK_BYTES' types -> the planes of `kind` (gguf_checkpoint's CARRIED): Q8_0 -> q8,
    Q5_0 -> q5 or q8, Q4_0 -> q4, Q4_K -> q4k, Q6_K -> q6k."""
    if kind == "q5":
        return q5_planes(raw)
    if block_type == "Q4_0":
        return q4_planes(raw)
    if block_type == "Q4_K":
        return q4k_planes(raw)
    if block_type == "Q6_K":
        return q6k_planes(raw)
    return q8_planes(raw, block_type)


def encode_q5_0(w: np.ndarray) -> np.ndarray:
    """w [R, C] -> Q5_0 rows [R, C/32 * 22]: d = (the signed value of largest magnitude) / -16, round to nearest."""
    R, C = w.shape
    g = w.astype(np.float32).reshape(R, C // 32, 32)
    big = np.take_along_axis(g, np.abs(g).argmax(-1)[..., None], -1)[..., 0]          # [R, G]
    d = (big / -16).astype(np.float16)
    inv = np.where(d == 0, 0, 1 / np.where(d == 0, 1, d.astype(np.float32)))
    q = np.clip(np.rint(g * inv[..., None]) + 16, 0, 31).astype(np.uint8)            # [R, G, 32]
    qh = (((q >> 4).astype(np.uint32)) << np.arange(32, dtype=np.uint32)).sum(-1, dtype=np.uint32)
    out = np.concatenate([d[..., None].view(np.uint8), qh[..., None].view(np.uint8), _pack_nibbles(q & 15)], -1)
    return out.reshape(R, -1)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """(sc, mn) [..., 8] in 0..63 -> the 12 bytes of Q4_K (inverse of _k_scales)."""
    a = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    b = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    c = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return np.concatenate([a, b, c], axis=-1).astype(np.uint8)


def encode_q4_k(w: np.ndarray) -> np.ndarray:
    """w [R, C] (C a multiple of 256) -> Q4_K rows [R, C/256 * 144]: each sub-block of 32 spans [min(lo, 0), hi]
    in 15 steps, its step and -min rounded to 6 bits against the block's fp16 d and dmin, weights to nearest."""
    R, C = w.shape
    x = w.astype(np.float32).reshape(R, C // 256, 8, 32)
    lo, hi = np.minimum(x.min(-1), 0), x.max(-1)                                    # [R, S, 8]
    step, neg = (hi - lo) / 15, -lo
    d, dmin = (step.max(-1) / 63).astype(np.float16), (neg.max(-1) / 63).astype(np.float16)     # [R, S]

    def six_bits(v: np.ndarray, unit: np.ndarray) -> np.ndarray:
        u = unit.astype(np.float32)[..., None]
        return np.clip(np.rint(np.divide(v, u, out=np.zeros_like(v), where=u > 0)), 0, 63).astype(np.uint8)
    sc, mn = six_bits(step, d), six_bits(neg, dmin)
    scale = d.astype(np.float32)[..., None] * sc                                     # [R, S, 8]
    shift = dmin.astype(np.float32)[..., None] * mn
    q = np.divide(x + shift[..., None], scale[..., None], out=np.zeros_like(x), where=scale[..., None] > 0)
    q = np.clip(np.rint(q), 0, 15).astype(np.uint8).reshape(R, C // 256, 4, 2, 32)
    qs = (q[:, :, :, 0] | (q[:, :, :, 1] << 4)).reshape(R, C // 256, 128)
    out = np.concatenate([d[..., None].view(np.uint8), dmin[..., None].view(np.uint8), _pack_k_scales(sc, mn), qs],
                         axis=-1)
    return out.reshape(R, -1)


def encode_q6_k(w: np.ndarray) -> np.ndarray:
    """w [R, C] (C a multiple of 256) -> Q6_K rows [R, C/256 * 210]: each 16 weights' step (largest magnitude / 31)
    rounded to an int8 multiple of the block's fp16 d, weights to nearest in -32..31."""
    R, C = w.shape
    S = C // 256
    x = w.astype(np.float32).reshape(R, S, 16, 16)
    step = np.abs(x).max(-1) / 31                                                     # [R, S, 16]
    d = (step.max(-1) / 127).astype(np.float16)                                      # [R, S]
    u = d.astype(np.float32)[..., None]
    sc = np.clip(np.rint(np.divide(step, u, out=np.zeros_like(step), where=u > 0)), -128, 127).astype(np.int8)
    scale = (u * sc)[..., None]                                                       # [R, S, 16, 1]
    q = np.divide(x, scale, out=np.zeros_like(x), where=scale != 0)
    q = (np.clip(np.rint(q), -32, 31) + 32).astype(np.uint8).reshape(R, S, 2, 4, 32)  # [.., half, quarter, l]
    ql = np.concatenate([(q[..., 0, :] & 15) | ((q[..., 2, :] & 15) << 4),
                         (q[..., 1, :] & 15) | ((q[..., 3, :] & 15) << 4)], axis=-1)   # [R, S, 2, 64]
    qh = (q[..., 0, :] >> 4) | ((q[..., 1, :] >> 4) << 2) | ((q[..., 2, :] >> 4) << 4) | ((q[..., 3, :] >> 4) << 6)
    out = np.concatenate([ql.reshape(R, S, 128), qh.reshape(R, S, 64), sc.view(np.uint8), d[..., None].view(np.uint8)],
                         axis=-1)
    return out.reshape(R, -1)

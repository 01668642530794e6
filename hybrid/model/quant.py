"""Routed-expert weight formats: the checkpoint's own (bf16), q8 and q4, and the function they define.

A quantized matrix [R, C] is cut into groups of GROUP = 32 weights along each row (llama.cpp's block size) and
stored as planes, one after another in the expert's byte buffer:
- q8: int8 q [R, C], fp16 scale d [R, C/32]; w = d * q (llama.cpp's Q8_0, planar).
- q4: nibbles [R, C/2], fp16 scale d and fp16 min m [R, C/32]; w = d * q + m, q in 0..15 (Q4_1, planar). Within a
  group byte i holds q[i] in its low nibble and q[i + 16] in its high one, as in ggml's blocks, so Q4_0
  (m = -8d) and Q4_1 files can be carried without requantizing; Q4_K's scales (d * sc, an fp16 times a 6-bit
  integer) round to fp16.
An expert is w13 = [gate; up] ([2I, Hd]) then w2 = down ([Hd, I]). The model's function with quantized experts is
the model whose expert weights are `dequantize`d (in fp32, then cast to the compute dtype)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .config import EXPERT_FORMATS, ConfigError, ModelConfig

GROUP = 32
FORMATS = EXPERT_FORMATS
BITS = {"bf16": 16, "q8": 8, "q4": 4}


@dataclass(frozen=True)
class Matrix:
    """One quantized matrix's planes in an expert buffer: q (rows x cols x bits/8 bytes), scales, then mins (q4)."""
    rows: int
    cols: int
    bits: int
    offset: int                  # bytes from the start of the expert buffer

    @property
    def groups(self) -> int:
        return self.rows * self.cols // GROUP

    @property
    def q_bytes(self) -> int:
        return self.rows * self.cols * self.bits // 8

    @property
    def nbytes(self) -> int:
        return self.q_bytes + 2 * self.groups * (2 if self.bits == 4 else 1)

    def planes(self, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Views of the planes in buf [..., expert bytes] (uint8): q [..., R, C*bits/8] (int8 for q8, uint8 for
        q4), d [..., R, C/32] fp16, m [..., R, C/32] fp16 or None."""
        lead, R, C, o = buf.shape[:-1], self.rows, self.cols, self.offset
        q = buf[..., o:o + self.q_bytes].reshape(*lead, R, C * self.bits // 8)
        q = q.view(torch.int8) if self.bits == 8 else q
        s = o + self.q_bytes
        d = buf[..., s:s + 2 * self.groups].view(torch.float16).reshape(*lead, R, C // GROUP)
        if self.bits == 8:
            return q, d, None
        s += 2 * self.groups
        return q, d, buf[..., s:s + 2 * self.groups].view(torch.float16).reshape(*lead, R, C // GROUP)


@dataclass(frozen=True)
class ExpertLayout:
    """Where w13 and w2 sit in one quantized expert's bytes."""
    fmt: str
    w13: Matrix
    w2: Matrix

    @property
    def nbytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes


def layout(cfg: ModelConfig, fmt: str) -> ExpertLayout:
    if fmt not in ("q8", "q4"):
        raise ValueError(f"{fmt!r} is not a quantized expert format: choose q8 or q4")
    I, Hd = cfg.moe_intermediate_size, cfg.hidden_size
    if I % GROUP or Hd % GROUP:
        raise ConfigError(f"--experts {fmt} needs hidden_size ({Hd}) and moe_intermediate_size ({I}) to be "
                          f"multiples of {GROUP}")
    w13 = Matrix(2 * I, Hd, BITS[fmt], 0)
    return ExpertLayout(fmt, w13, Matrix(Hd, I, BITS[fmt], w13.nbytes))


def expert_bytes(cfg: ModelConfig, fmt: str, itemsize: int) -> int:
    """Bytes of one routed expert in `fmt` (bf16: the compute dtype's itemsize per weight)."""
    return cfg.expert_numel * itemsize if fmt == "bf16" else layout(cfg, fmt).nbytes


def quantize_matrix(w: torch.Tensor, bits: int) -> torch.Tensor:
    """w [R, C] (any float dtype) -> its planes as bytes [R*C*bits/8 + scales (+ mins)], round to nearest."""
    R, C = w.shape
    g = w.float().reshape(R, C // GROUP, GROUP)                                         # [R, G, 32]
    if bits == 8:
        d = (g.abs().amax(-1) / 127).half()                                              # [R, G]
        inv = torch.where(d == 0, 0.0, 1 / d.float())
        q = torch.round(g * inv[..., None]).clamp_(-127, 127).to(torch.int8)
        return torch.cat([q.reshape(-1).view(torch.uint8), d.reshape(-1).view(torch.uint8)])
    lo, hi = g.amin(-1), g.amax(-1)
    d, m = ((hi - lo) / 15).half(), lo.half()                                            # [R, G]
    inv = torch.where(d == 0, 0.0, 1 / d.float())
    q = torch.round((g - m.float()[..., None]) * inv[..., None]).clamp_(0, 15).to(torch.uint8)   # [R, G, 32]
    packed = q[..., :16] | (q[..., 16:] << 4)                                           # [R, G, 16]
    return torch.cat([packed.reshape(-1), d.reshape(-1).view(torch.uint8), m.reshape(-1).view(torch.uint8)])


def dequantize_matrix(buf: torch.Tensor, mat: Matrix) -> torch.Tensor:
    """buf [..., expert bytes] -> the matrix's weights [..., R, C] in float32."""
    q, d, m = mat.planes(buf)
    lead, R, G = q.shape[:-2], mat.rows, mat.cols // GROUP
    if mat.bits == 8:
        w = q.float().reshape(*lead, R, G, GROUP) * d.float()[..., None]
    else:
        b = q.reshape(*lead, R, G, GROUP // 2)
        nib = torch.cat([b & 15, b >> 4], dim=-1).float()                                # [..., R, G, 32]
        w = nib * d.float()[..., None] + m.float()[..., None]
    return w.reshape(*lead, R, mat.cols)


def quantize_expert(lay: ExpertLayout, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """gate, up [I, Hd], down [Hd, I] -> the expert's bytes [lay.nbytes] (uint8)."""
    bits = lay.w13.bits
    return torch.cat([quantize_matrix(torch.cat([gate, up]), bits), quantize_matrix(down, bits)])


def dequantize_expert(lay: ExpertLayout, buf: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """buf [..., nbytes] -> (w13 [..., 2I, Hd], w2 [..., Hd, I]) in `dtype` (dequantized in fp32, then cast)."""
    return dequantize_matrix(buf, lay.w13).to(dtype), dequantize_matrix(buf, lay.w2).to(dtype)


def split_planes(lay: ExpertLayout, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's bytes -> (w13's planes, w2's planes): the views the CPU kernel takes (and `dequantize_parts`)."""
    return buf[:lay.w13.nbytes], buf[lay.w13.nbytes:lay.nbytes]


def dequantize_parts(lay: ExpertLayout, w13: torch.Tensor, w2: torch.Tensor,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`split_planes`'s views -> (w13 [2I, Hd], w2 [Hd, I]) in `dtype`."""
    return (dequantize_matrix(w13, replace(lay.w13, offset=0)).to(dtype),
            dequantize_matrix(w2, replace(lay.w2, offset=0)).to(dtype))

"""Routed-expert weight formats: the checkpoint's own (bf16), q8, q4 and q4k, and the function they define.

A quantized matrix [R, C] is cut into groups of GROUP = 32 weights along each row (llama.cpp's block size) and
stored as planes, one after another in the expert's byte buffer (a Matrix's `kind`):
- q8: int8 q [R, C], fp16 scale d [R, C/32]; w = d * q (llama.cpp's Q8_0, planar; Q5_0 moves in as q - 16 where a
  tensor mixes it with Q8_0).
- q5: nibbles [R, C/2] as q4, fp16 d [R, C/32], int32 qh [R, C/32] (bit i: q[i]'s fifth bit); w = d * (q - 16)
  (Q5_0, planar).
- q4: nibbles [R, C/2], fp16 scale d and fp16 min m [R, C/32]; w = d * q + m, q in 0..15 (Q4_1, planar). Within a
  group byte i holds q[i] in its low nibble and q[i + 16] in its high one, as in ggml's blocks, so Q4_0
  (m = -8d) and Q4_1 files can be carried without requantizing.
- q4k: Q4_K, planar: nibbles as q4, fp16 d and dmin [R, C/256], 6-bit sc and mn (one byte each) [R, C/32];
  w = (d sc) q - dmin mn, each product exact in fp32 (ggml_blocks.py moves Q4_K blocks in, and encodes them).
- q6k: Q6_K, planar: int8 q - 32 [R, C], fp16 d [R, C/256], int8 sc [R, C/16]; w = (d sc) q. Only for a GGUF
  file's matrices outside the routed experts (its Q6_K shared downs and output head), on the GPU's kernels.
An expert is w13 = [gate; up] ([2I, Hd]) then w2 = down ([Hd, I]). Format q4k is q4k gate/up with a q8 down (what
llama.cpp's Q4_K_M holds for V2-Lite: its downs are Q5_0 or Q8_0, rows of 1,408 fitting no 256-block; a GGUF's Q5_0
layers keep a q5 down: gguf_checkpoint.layer_layout). The model's
function with quantized experts is the model whose expert weights are `dequantize`d (in fp32, then cast)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
import torch

from . import ggml_blocks
from .config import EXPERT_FORMATS, ConfigError, ModelConfig

GROUP = 32
SUPER = 256                   # q4k's block of d and dmin
FORMATS = EXPERT_FORMATS
KINDS = {"q8": 1, "q4": 2, "q4k": 3, "q6k": 4, "q5": 5}   # a matrix's kind -> its code in the kernels (cpu_quant.h,
                                                        # quant_gpu.py; q6k: GPU only, for a GGUF file's Q6_K
                                                        # matrices outside the experts)
MATRICES = {"q5": ("q5", "q5"), "q8": ("q8", "q8"), "q4": ("q4", "q4"),   # format -> kinds of (w13, w2), in the
            "q4k": ("q4k", "q8")}                                          # order a GGUF's blocks are matched
SCALE_PLANES = {                          # kind -> the planes after q, in order: (weights per value, dtype)
    "q8": ((GROUP, torch.float16),),
    "q4": ((GROUP, torch.float16), (GROUP, torch.float16)),
    "q4k": ((SUPER, torch.float16), (SUPER, torch.float16), (GROUP, torch.uint8), (GROUP, torch.uint8)),
    "q5": ((GROUP, torch.float16), (GROUP, torch.int32)),
    "q6k": ((SUPER, torch.float16), (16, torch.int8))}


class Planes(NamedTuple):
    """Views of one matrix's planes; fields a kind lacks are None."""
    q: torch.Tensor               # int8 [..., R, C] (q8; q6k: q - 32) or nibbles uint8 [..., R, C/2]
    d: torch.Tensor               # fp16 [..., R, C/32] (q4k, q6k: [..., R, C/256])
    m: torch.Tensor | None = None     # fp16 min [..., R, C/32] (q4); dmin [..., R, C/256] (q4k)
    sc: torch.Tensor | None = None    # uint8 [..., R, C/32] (q4k); int8 [..., R, C/16] (q6k); q5: its qh, int32
    mn: torch.Tensor | None = None    # [..., R, C/32] (bit i: q[i]'s fifth bit)


@dataclass(frozen=True)
class Matrix:
    """One quantized matrix's planes in an expert buffer: q, then its scales (Planes' order)."""
    rows: int
    cols: int
    kind: str
    offset: int                  # bytes from the start of the expert buffer

    @property
    def code(self) -> int:
        return KINDS[self.kind]

    @property
    def q_bytes(self) -> int:
        return self.rows * self.cols // (1 if self.kind in ("q8", "q6k") else 2)

    @property
    def scale_bytes(self) -> int:
        return sum(self.rows * self.cols // per * dtype.itemsize for per, dtype in SCALE_PLANES[self.kind])

    @property
    def nbytes(self) -> int:
        return self.q_bytes + self.scale_bytes

    def planes(self, buf: torch.Tensor) -> Planes:
        """Views of the planes in buf [..., expert bytes] (uint8)."""
        lead, R, C, at = buf.shape[:-1], self.rows, self.cols, self.offset + self.q_bytes
        q = buf[..., self.offset:at].reshape(*lead, R, -1)
        scales = []
        for per, dtype in SCALE_PLANES[self.kind]:
            n = R * (C // per) * dtype.itemsize
            scales.append(buf[..., at:at + n].view(dtype).reshape(*lead, R, C // per))
            at += n
        if self.kind == "q6k":
            return Planes(q.view(torch.int8), scales[0], None, scales[1])
        if self.kind == "q5":
            return Planes(q, scales[0], None, scales[1])
        return Planes(q.view(torch.int8) if self.kind == "q8" else q, *scales)


@dataclass(frozen=True)
class ExpertLayout:
    """Where w13 and w2 sit in one quantized expert's bytes."""
    fmt: str
    w13: Matrix
    w2: Matrix

    @property
    def nbytes(self) -> int:
        return self.w13.nbytes + self.w2.nbytes

    @property
    def code(self) -> int:
        """The native kernel's format code: w13's kind + 4 x w2's."""
        return self.w13.code + 4 * self.w2.code


def layout(cfg: ModelConfig, fmt: str) -> ExpertLayout:
    if fmt not in MATRICES:
        raise ValueError(f"{fmt!r} is not a quantized expert format: choose one of {', '.join(MATRICES)}")
    I, Hd = cfg.moe_intermediate_size, cfg.hidden_size
    if I % GROUP or Hd % GROUP:
        raise ConfigError(f"--experts {fmt} needs hidden_size ({Hd}) and moe_intermediate_size ({I}) to be "
                          f"multiples of {GROUP}")
    if fmt == "q4k" and Hd % SUPER:
        raise ConfigError(f"--experts q4k needs hidden_size ({Hd}) to be a multiple of {SUPER}")
    return ffn_layout(I, Hd, MATRICES[fmt], fmt)


def ffn_layout(I: int, Hd: int, kinds: tuple[str, str], fmt: str) -> ExpertLayout:
    """A gated FFN of width I in planes of `kinds` (w13's, w2's): a routed expert's, or (a GGUF file's) shared
    experts' as one FFN of width n_shared x I."""
    w13 = Matrix(2 * I, Hd, kinds[0], 0)
    return ExpertLayout(fmt, w13, Matrix(Hd, I, kinds[1], w13.nbytes))


def expert_bytes(cfg: ModelConfig, fmt: str, itemsize: int) -> int:
    """Bytes of one routed expert in `fmt` (bf16: the compute dtype's itemsize per weight)."""
    return cfg.expert_numel * itemsize if fmt == "bf16" else layout(cfg, fmt).nbytes


def plane_bytes(planes) -> torch.Tensor:
    """Numpy planes (in Planes' order) -> one matrix's bytes [nbytes] (uint8)."""
    return torch.from_numpy(np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in planes]))


def quantize_matrix(w: torch.Tensor, kind: str) -> torch.Tensor:
    """w [R, C] (any float dtype) -> its planes as bytes [Matrix.nbytes], round to nearest."""
    R, C = w.shape
    if kind in ("q4k", "q6k", "q5"):
        enc, planes = {"q4k": (ggml_blocks.encode_q4_k, ggml_blocks.q4k_planes),
                       "q6k": (ggml_blocks.encode_q6_k, ggml_blocks.q6k_planes),
                       "q5": (ggml_blocks.encode_q5_0, ggml_blocks.q5_planes)}[kind]
        return plane_bytes(planes(enc(w.float().numpy())))
    g = w.float().reshape(R, C // GROUP, GROUP)                                         # [R, G, 32]
    if kind == "q8":
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


def group_scales(p: Planes, kind: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each group's scale and min in fp32 [..., R, C/32] (min None for q8): q4k's two levels multiplied out."""
    if kind == "q8":
        return p.d.float(), None
    if kind == "q4":
        return p.d.float(), p.m.float()
    per = p.sc.shape[-1] // p.d.shape[-1]
    return (p.d.float().repeat_interleave(per, -1) * p.sc.float(),
            -(p.m.float().repeat_interleave(per, -1) * p.mn.float()))


def dequantize_matrix(buf: torch.Tensor, mat: Matrix) -> torch.Tensor:
    """buf [..., expert bytes] -> the matrix's weights [..., R, C] in float32."""
    p = mat.planes(buf)
    if mat.kind == "q6k":
        lead, R = p.q.shape[:-2], mat.rows
        scale = p.d.float().repeat_interleave(SUPER // 16, -1) * p.sc.float()                # [..., R, C/16]
        return (p.q.float().reshape(*lead, R, -1, 16) * scale[..., None]).reshape(*lead, R, mat.cols)
    if mat.kind == "q5":
        lead, R, G = p.q.shape[:-2], mat.rows, mat.cols // GROUP
        b = p.q.reshape(*lead, R, G, GROUP // 2)
        bits = (p.sc[..., None] >> torch.arange(GROUP, device=b.device, dtype=torch.int32)) & 1    # [..., R, G, 32]
        q = torch.cat([b & 15, b >> 4], dim=-1).to(torch.int32) + 16 * bits - 16
        return (q.float() * p.d.float()[..., None]).reshape(*lead, R, mat.cols)
    d, m = group_scales(p, mat.kind)
    lead, R, G = p.q.shape[:-2], mat.rows, mat.cols // GROUP
    if mat.kind == "q8":
        w = p.q.float().reshape(*lead, R, G, GROUP) * d[..., None]
    else:
        b = p.q.reshape(*lead, R, G, GROUP // 2)
        nib = torch.cat([b & 15, b >> 4], dim=-1).float()                                # [..., R, G, 32]
        w = nib * d[..., None] + m[..., None]
    return w.reshape(*lead, R, mat.cols)


def quantize_expert(lay: ExpertLayout, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """gate, up [I, Hd], down [Hd, I] -> the expert's bytes [lay.nbytes] (uint8)."""
    return torch.cat([quantize_matrix(torch.cat([gate, up]), lay.w13.kind), quantize_matrix(down, lay.w2.kind)])


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

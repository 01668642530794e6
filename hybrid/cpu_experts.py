"""A layer's CPU experts in one call: the native kernel (`cpu_kernel.cpp`) for decode-sized experts, torch above.

Decode puts a few tokens on each CPU expert: the work is reading the expert's 17 MB from DRAM once, which a plain
fp32-accumulating kernel does at close to memory bandwidth, while torch's bf16 linear (oneDNN) pays for packing
and blocking meant for larger matrices. Experts with many tokens (prefill) go to torch, whose AMX GEMMs win there."""
from __future__ import annotations

import ctypes
import warnings
from typing import List

import torch
import torch.nn.functional as F

from .cpu_kernel import DTYPES, KernelUnavailable, load

NATIVE_MAX_TOKENS = 8          # tokens per expert up to which the native kernel is used
KINDS = ("auto", "native", "torch")


def _torch_experts(x: torch.Tensor, out: torch.Tensor, w13: List[torch.Tensor], w2: List[torch.Tensor],
                   starts: List[int], counts: List[int]) -> None:
    """out[s:s+c] = expert_j(x[s:s+c]) for each expert j (w13 [2I, Hd] gate then up rows, w2 [Hd, I])."""
    for j in range(len(w13)):
        s, c = starts[j], counts[j]
        gu = F.linear(x[s:s + c], w13[j])
        inter = gu.shape[-1] // 2
        out[s:s + c] = F.linear(F.silu(gu[:, :inter]) * gu[:, inter:], w2[j])


with warnings.catch_warnings():             # torch 2.13 marks TorchScript deprecated; it still runs, GIL-free
    warnings.simplefilter("ignore", DeprecationWarning)
    torch_experts = torch.jit.script(_torch_experts)


class CpuExperts:
    """`run(x, out, w13s, w2s, starts, counts)`: out[s:s+c] = expert_j(x[s:s+c]) for each expert j.

    kind: "native" (the kernel for experts of <= max_tokens tokens; an error if it cannot be built), "torch", or
    "auto" (native where it builds, else torch, with the reason in `why`)."""

    def __init__(self, kind: str = "auto", max_tokens: int = NATIVE_MAX_TOKENS):
        if kind not in KINDS:
            raise ValueError(f"unknown CPU expert kernel {kind!r}: choose one of {', '.join(KINDS)}")
        self.lib, self.why, self.max_tokens = None, "", max_tokens
        if kind != "torch":
            try:
                self.lib = load()
            except KernelUnavailable as e:
                if kind == "native":
                    raise
                self.why = str(e)
        self.kind = "native" if self.lib is not None else "torch"
        self.scratch = torch.empty(0)

    def run(self, x: torch.Tensor, out: torch.Tensor, w13: list, w2: list, starts: list, counts: list) -> None:
        if self.lib is None or x.dtype not in DTYPES or x.shape[1] % 16 or w2[0].shape[1] % 16:
            torch_experts(x, out, w13, w2, starts, counts)
            return
        small = [j for j, c in enumerate(counts) if c <= self.max_tokens]
        if len(small) < len(counts):
            big = [j for j, c in enumerate(counts) if c > self.max_tokens]
            torch_experts(x, out, [w13[j] for j in big], [w2[j] for j in big], [starts[j] for j in big],
                          [counts[j] for j in big])
        if small:
            self._native(x, out, [w13[j] for j in small], [w2[j] for j in small], [starts[j] for j in small],
                         [counts[j] for j in small])

    def _native(self, x, out, w13, w2, starts, counts) -> None:
        rows, H = x.shape                                                     # x, out: [rows, H]
        inter = w2[0].shape[1]
        need = rows * (H + 3 * inter)
        if self.scratch.numel() < need:
            self.scratch = torch.empty(max(need, 2 * self.scratch.numel()), dtype=torch.float32)
        base, f = self.scratch.data_ptr(), self.scratch.element_size()
        n = len(w13)
        assert x.is_contiguous() and out.is_contiguous() and all(w.is_contiguous() for w in w13 + w2)
        err = self.lib.moe_cpu_experts(
            DTYPES[x.dtype], n, (ctypes.c_void_p * n)(*[w.data_ptr() for w in w13]),
            (ctypes.c_void_p * n)(*[w.data_ptr() for w in w2]), (ctypes.c_int * n)(*starts),
            (ctypes.c_int * n)(*counts), x.data_ptr(), out.data_ptr(), rows, H, inter,
            base, base + rows * H * f, base + rows * (H + 2 * inter) * f)
        if err:
            raise RuntimeError(f"native CPU expert kernel refused its input (code {err})")

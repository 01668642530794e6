"""A layer's CPU experts in one call: the native kernel (`cpu_kernel.cpp`) for decode-sized experts, torch above.

Decode puts a few tokens on each CPU expert: the work is reading the expert's 17 MB from DRAM once, which a plain
fp32-accumulating kernel does at close to memory bandwidth, while torch's bf16 linear (oneDNN) pays for packing
and blocking meant for larger matrices. Experts with more tokens (prefill) take the kernel's tile path (AMX, bf16)
where the CPU has it, on the same pool, so prefill's CPU lane starts as early as decode's; elsewhere they go to
torch."""
from __future__ import annotations

import time
import warnings
from typing import List

import numpy as np
import torch

from ..model.deepseek import gated_ffn
from ..model.quant import ExpertLayout, dequantize_parts
from .cpu_kernel import DTYPES, NATIVE, KernelUnavailable, load

NATIVE_MAX_TOKENS = 8          # tokens per expert up to which the native kernel is used (faster at 1-8 tokens,
                               # slower at 16 than torch's AMX path on the GPU box: eval/probes/kernel_probe.py)
QUANT_TILE_TOKENS = 8          # quantized experts: a call with more tokens per expert on average takes the tile path
                               # (one core, V2-Lite q4k: level at 6, 1.2-1.3x at 8, 3.1-3.5x at 48, 5x at 128)
KINDS = ("auto", "native", "torch")
TILES = {"auto": None, "off": 0, "emulate": 2}      # emulate: the tile path in plain C++ (tests without AMX)
DOTS = {"auto": None, "off": 0, "emulate": 2}       # the bf16 dot-product path; emulate: in plain C++ (tests)


def _torch_experts(x: torch.Tensor, out: torch.Tensor, w13: List[torch.Tensor], w2: List[torch.Tensor],
                   starts: List[int], counts: List[int]) -> None:
    """out[s:s+c] = expert_j(x[s:s+c]) for each expert j (w13 [2I, Hd] gate then up rows, w2 [Hd, I])."""
    for j in range(len(w13)):
        s, c = starts[j], counts[j]
        out[s:s + c] = gated_ffn(x[s:s + c], w13[j], w2[j])


with warnings.catch_warnings():             # torch 2.13 marks TorchScript deprecated; it still runs, GIL-free
    warnings.simplefilter("ignore", DeprecationWarning)
    torch_experts = torch.jit.script(_torch_experts)


def pointer_table(views: list[tuple[torch.Tensor, torch.Tensor]]) -> np.ndarray:
    """[E, 2] int64: the addresses of each expert's (w13, w2), for `CpuExperts.run_rows`."""
    return np.array([[w13.data_ptr(), w2.data_ptr()] for w13, w2 in views], dtype=np.int64)


class CallArrays:
    """The native call's small arrays (each expert's w13 and w2 address, segment starts and counts, input rows),
    kept between calls at fixed addresses: numpy's `.ctypes` costs microseconds per array and call, on the
    critical path of every layer's CPU lane. One call at a time uses them."""

    def __init__(self, experts: int = 64, rows: int = 256):
        self._make(experts, rows)

    def _make(self, experts: int, rows: int) -> None:
        self.w13, self.w2 = np.zeros(experts, np.int64), np.zeros(experts, np.int64)
        self.st, self.ct, self.xr = np.zeros(experts, np.int32), np.zeros(experts, np.int32), np.zeros(rows, np.int32)
        self.addr = [a.ctypes.data for a in (self.w13, self.w2, self.st, self.ct, self.xr)]

    def fill(self, ptrs: np.ndarray, starts, counts, rows: np.ndarray | None) -> list:
        """ptrs [n, 2], starts / counts [n], rows [r] or None -> the addresses of w13, w2, starts, counts, rows
        (None for no rows)."""
        n, r = len(counts), 0 if rows is None else rows.shape[0]
        if n > self.st.shape[0] or r > self.xr.shape[0]:
            self._make(max(n, 2 * self.st.shape[0]), max(r, 2 * self.xr.shape[0]))
        self.w13[:n], self.w2[:n] = ptrs[:, 0], ptrs[:, 1]
        self.st[:n], self.ct[:n] = starts, counts
        if rows is not None:
            self.xr[:r] = rows
        return self.addr[:4] + [None if rows is None else self.addr[4]]


class CpuExperts:
    """A layer's CPU experts in one call: out[s:s+c] = expert_j(x[s:s+c]) for each expert j.

    kind: "native" (the kernel for experts of <= max_tokens tokens; an error if it cannot be built), "torch", or
    "auto" (native where it builds, else torch, with the reason in `why`). With pool_threads > 0 the native
    kernel runs on the library's own thread pool: `start_rows` returns at once and `wait` collects the result,
    so the caller can queue GPU work meanwhile; idle pool threads spin `spin_us` before they sleep.
    tiles: "auto" (calls with more than max_tokens tokens on an expert take the AMX tile path where this machine
    has it), "off", or "emulate" (the tile path's plain C++ emulation, for tests). dot: bf16 activations against
    bf16, q4 or q4k weights on the pair dot product ("auto": where the CPU has AVX512-BF16), "off", or "emulate"
    (its plain C++ emulation, for tests). march: the kernel's build
    target (tests also build a baseline without AVX-512 and AMX). quant: the layout of quantized experts (then
    w13 / w2 are their planes, quant.split_planes); the native kernel takes them at any token count: on its
    vector path, or with bf16 activations and more than QUANT_TILE_TOKENS tokens per expert on average, on the tile
    path (weights dequantized to bf16, as the GPU's prefill scratch holds them)."""

    def __init__(self, kind: str = "auto", max_tokens: int = NATIVE_MAX_TOKENS, pool_threads: int = 0,
                 spin_us: int = 0, tiles: str = "auto", march: str = NATIVE, quant: ExpertLayout | None = None,
                 dot: str = "auto"):
        if kind not in KINDS:
            raise ValueError(f"unknown CPU expert kernel {kind!r}: choose one of {', '.join(KINDS)}")
        if tiles not in TILES:
            raise ValueError(f"unknown tile setting {tiles!r}: choose one of {', '.join(TILES)}")
        if dot not in DOTS:
            raise ValueError(f"unknown dot setting {dot!r}: choose one of {', '.join(DOTS)}")
        self.lib, self.why, self.quant = None, "", quant
        self.max_tokens = max_tokens if quant is None else 1 << 30          # the vector path's limit
        self.wfmt = quant.code if quant else 0
        if kind != "torch":
            try:
                self.lib = load(march)
            except KernelUnavailable as e:
                if kind == "native":
                    raise
                self.why = str(e)
        self.kind = "native" if self.lib is not None else "torch"
        self.pool_threads = pool_threads if self.lib is not None else 0
        self.spin_ns = 1000 * spin_us
        self.tiles = 0 if self.lib is None else TILES[tiles] if TILES[tiles] is not None else self.lib.moe_tiles()
        self.dot = 0 if self.lib is None else DOTS[dot] if DOTS[dot] is not None else self.lib.moe_dot()
        self.label = (self.kind + ("+pool" if self.pool_threads else "") + ("", "+amx", "+amxemu")[self.tiles]
                      + ("", "+dot", "+dotemu")[self.dot])
        self.scratch = torch.empty(0)
        self.pending: tuple | None = None       # the started job's arguments, alive until `wait`
        self.arrays = CallArrays()
        self.called = 0.0

    def use(self, quant: ExpertLayout | None) -> None:
        """The layout of the experts in the calls that follow (a GGUF's layers may hold different downs)."""
        if quant is not self.quant:
            self.quant, self.wfmt = quant, quant.code if quant else 0

    def _fits(self, x: torch.Tensor, inter: int) -> bool:
        """Whether the native kernel takes this dtype and these sizes at all."""
        q = 32 if self.quant else 16
        return self.lib is not None and x.dtype in DTYPES and x.shape[1] % q == 0 and inter % q == 0

    def _inter(self, w2) -> int:
        return self.quant.w2.cols if self.quant else w2.shape[1]

    def _dense(self, w13: list, w2: list, dtype: torch.dtype) -> tuple[list, list]:
        """The weights as torch's path takes them (quantized experts dequantized)."""
        if self.quant is None:
            return w13, w2
        pairs = [dequantize_parts(self.quant, a, b, dtype) for a, b in zip(w13, w2)]
        return [a for a, _ in pairs], [b for _, b in pairs]

    def _mode(self, x: torch.Tensor, inter: int, counts) -> int | None:
        """How the native kernel runs a call: 0 vector path, 1/2 tile path (AMX / emulated), None: not at all."""
        if not self._fits(x, inter):
            return None
        ok = self.tiles and x.dtype == torch.bfloat16 and x.shape[1] % 32 == 0 and inter % 32 == 0
        big = sum(counts) > QUANT_TILE_TOKENS * len(counts) if self.quant else max(counts) > self.max_tokens
        if ok and big:
            return self.tiles
        return 0 if max(counts) <= self.max_tokens else None

    def run(self, x: torch.Tensor, out: torch.Tensor, w13: list, w2: list, starts: list, counts: list) -> None:
        """x, out: [rows, H]; expert j (weights w13[j] [2I, H], w2[j] [H, I]) owns rows starts[j]..+counts[j]."""
        inter = self._inter(w2[0])
        mode = self._mode(x, inter, counts)
        if mode:
            self._native(x, None, out, pointer_table(list(zip(w13, w2))), starts, counts, inter, tiles=mode)
            return
        limit = self.max_tokens if self._fits(x, inter) else 0
        small = [j for j, c in enumerate(counts) if c <= limit]
        big = [j for j, c in enumerate(counts) if c > limit]
        if big:                                  # torch's OpenMP team runs this call: the pool sleeps
            if self.pool_threads:
                self.lib.moe_pool_park()
            torch_experts(x, out, *self._dense([w13[j] for j in big], [w2[j] for j in big], x.dtype),
                          [starts[j] for j in big], [counts[j] for j in big])
        if small:
            ptrs = pointer_table([(w13[j], w2[j]) for j in small])
            self._native(x, None, out, ptrs, [starts[j] for j in small], [counts[j] for j in small],
                         inter, pool=not big)

    def run_rows(self, x: torch.Tensor, rows: np.ndarray, out: torch.Tensor, views: list, ptrs: np.ndarray,
                 segments: list[tuple[int, int, int]], gather: torch.Tensor) -> None:
        """The runtime's call: out[a:a+c] = expert_e(x[rows[a:a+c]]) for each segment (e, a, c). x [T, H] holds
        the layer's input in token order, rows [n] the token of each output row; views[e] = (w13, w2) and
        ptrs = pointer_table(views). The native kernel reads x through rows; torch gathers into `gather` first."""
        experts, starts, counts = zip(*segments)
        inter = self._inter(views[0][1])
        mode = self._mode(x, inter, counts)
        if mode is not None:
            self._native(x, rows, out, ptrs[list(experts)], starts, counts, inter, tiles=mode)
            return
        xin = gather[:rows.shape[0]]
        torch.index_select(x, 0, torch.from_numpy(rows).long(), out=xin)
        self.run(xin, out, [views[e][0] for e in experts], [views[e][1] for e in experts], list(starts),
                 list(counts))

    def start_rows(self, x: torch.Tensor, rows: np.ndarray, out: torch.Tensor, views: list, ptrs: np.ndarray,
                   segments: list[tuple[int, int, int]]) -> bool:
        """`run_rows` on the pool, returning at once: True if started (then `wait` before reading out or
        starting another), False if this call does not fit the pool (no pool, too many tokens, dtype)."""
        experts, starts, counts = zip(*segments)
        inter = self._inter(views[0][1])
        mode = self._mode(x, inter, counts)
        if not self.pool_threads or mode is None:
            return False
        self._start(self._args(x, rows, out, ptrs[list(experts)], starts, counts, inter, mode))
        return True

    def _start(self, job: tuple) -> None:
        self.pending = job
        self.called = time.perf_counter()        # the foreign call's start (the runtime's phase log reads it)
        err = self.lib.moe_pool_start(self.pool_threads, self.spin_ns, *job[0])
        if err:
            self.pending = None
            raise RuntimeError(f"native CPU expert kernel refused its input (code {err})")

    def wait(self) -> float:
        """Block until the started job is done; -> its time on the pool in ms, from its start to its last item
        (not to this call's return: a caller that comes back late does not lengthen it)."""
        ns = self.lib.moe_pool_wait()
        self.pending = None
        return ns / 1e6

    def _args(self, x, rows, out, ptrs: np.ndarray, starts, counts, inter: int, tiles: int = 0) -> tuple:
        """(ctypes arguments of moe_cpu_experts, what they point into); ptrs [n, 2]: each expert's (w13, w2)."""
        if self.pending is not None:
            raise RuntimeError("the started CPU expert job is still running: wait for it first")
        n_rows, H = out.shape[0], x.shape[1]
        padded = 16 * sum((c + 15) // 16 for c in counts) if tiles else n_rows    # tile path: 16-token blocks
        in_f, gu_f = (padded * H // 2, padded * 2 * inter) if tiles else (n_rows * H, n_rows * 2 * inter)
        need = in_f + gu_f + padded * inter
        if self.scratch.numel() < need:
            self.scratch = torch.empty(max(need, 2 * self.scratch.numel()), dtype=torch.float32)
        base, f = self.scratch.data_ptr(), self.scratch.element_size()
        assert x.is_contiguous() and out.is_contiguous()
        w13p, w2p, st, ct, xr = self.arrays.fill(ptrs, starts, counts, rows)
        args = (DTYPES[x.dtype], len(counts), w13p, w2p, st, ct, x.data_ptr(), xr, out.data_ptr(), n_rows, H, inter,
                base, base + in_f * f, base + (in_f + gu_f) * f, tiles, self.wfmt, self.dot)
        return args, (x, out, self.scratch)

    def _native(self, x, rows, out, ptrs: np.ndarray, starts, counts, inter: int, pool: bool = True,
                tiles: int = 0) -> None:
        job = self._args(x, rows, out, ptrs, starts, counts, inter, tiles)
        if self.pool_threads and pool:
            self._start(job)
            self.wait()
        elif err := self.lib.moe_cpu_experts(*job[0]):
            raise RuntimeError(f"native CPU expert kernel refused its input (code {err})")

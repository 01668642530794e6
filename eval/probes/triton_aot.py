"""Compile Triton kernels for the H200 (sm_90) on a machine without a GPU: catches what Triton's interpreter (the
tests' path) lets through, before device time is spent. Covers the kernels whose GPU path changed last: the
quantized linear per plane kind, the grouped down kernel over q6k, the whole layers' tally.

    python eval/probes/triton_aot.py"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hybrid.kernels import quant_gpu  # noqa: E402
from hybrid.offload import pinned  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
PLANES = {"q_ptr": "*u8", "d_ptr": "*fp16", "m_ptr": "*fp16", "sc_ptr": "*u8", "mn_ptr": "*u8"}


def compile_ptx(fn, signature: dict, constants: dict) -> int:
    """-> the PTX's length; raises what the compiler raises."""
    sig = {**signature, **{k: "constexpr" for k in constants}}
    return len(triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constants), target=TARGET).asm["ptx"])


def main() -> None:
    tiles = {"small": (16, 32, 128), "prefill": (64, 64, 64)}
    for kind in (1, 2, 3, 4):
        planes = {**PLANES, "q_ptr": "*i8" if kind in (1, 4) else "*u8", "sc_ptr": "*i8" if kind == 4 else "*u8"}
        for name, (bm, bn, bk) in tiles.items():
            n = compile_ptx(quant_gpu._linear_kernel, {"x_ptr": "*bf16", "y_ptr": "*bf16", "M": "i32", **planes},
                            {"N": 3072, "K": 2048, "KIND": kind, "BM": bm, "BN": bn, "BK": bk, "PREC": "tf32"})
            print(f"linear kind {kind} {name}: {n} PTX chars")
    down = {"h_ptr": "*bf16", "y_ptr": "*bf16", "bounds_ptr": "*i32", "order_ptr": "*i32", **PLANES,
            "q_ptr": "*i8", "sc_ptr": "*i8", "slot_bytes": "i32"}
    n = compile_ptx(quant_gpu._down_kernel, down, {"N": 2048, "K": 2816, "KIND": 4, "BM": 16, "BN": 32, "BK": 128,
                                                   "PREC": "tf32"})
    print(f"grouped down, q6k: {n} PTX chars")
    n = compile_ptx(pinned._tally_kernel, {"idx_ptr": "*i64", "tally_ptr": "*i32", "N": "i32"}, {"E": 64, "BLOCK": 128})
    print(f"whole layers' tally: {n} PTX chars")


if __name__ == "__main__":
    main()

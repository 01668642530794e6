"""Host-to-device expert copies issued straight through the CUDA driver, one ctypes call a copy.

On the box's decode path, torch's `copy_` of a pinned expert into its slot under a copy-stream context cost 25-65 us
of host time a copy (a layer's copies went out 0.16 ms after its plan at batch 1, 0.21-0.27 ms at batch 16,
eval/results/reserve_h200/ab_*), and the copies are issued before the layer's CPU lane starts. The stream, the
events and everything else stay torch's: only the copy calls go to `cuMemcpyHtoDAsync` on the copy stream's handle,
in the order torch queued the stream's waits. Sources are the expert store's page-locked buffers and destinations
the cache's slots, both alive for the engine's life, so torch's allocator need not know of the copies."""
from __future__ import annotations

import ctypes
from typing import Callable

CopyFn = Callable[[int, int, int, int], int]      # (dst device pointer, src host pointer, bytes, stream) -> CUresult


class DriverCopy:
    def __init__(self, fn: CopyFn):
        self.fn = fn

    @classmethod
    def load(cls) -> "DriverCopy | None":
        """The driver's cuMemcpyHtoDAsync, or None where there is no CUDA driver (then torch copies)."""
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            fn = lib.cuMemcpyHtoDAsync_v2
        except (OSError, AttributeError):
            return None
        fn.argtypes = [ctypes.c_uint64, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        return cls(fn)

    def __call__(self, stream: int, copies: list[tuple[int, int, int]]) -> None:
        """Queue each (dst, src, nbytes) copy on `stream` (a CUstream handle; 0: the legacy default stream)."""
        for dst, src, n in copies:
            rc = self.fn(dst, src, n, stream)
            if rc != 0:
                raise RuntimeError(f"cuMemcpyHtoDAsync of {n} bytes failed with CUDA driver error {rc}")

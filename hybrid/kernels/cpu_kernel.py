"""Builds and loads `cpu_kernel.cpp`, the native CPU-expert kernel for decode-sized calls, through ctypes.

Compiled once per machine (`-march=native`: the build is keyed by the CPU model) into the cache folder
(`config.cache_dir()`/kernels); `python -m hybrid.kernels.cpu_kernel` builds it ahead of time.
Needs a C++ compiler (COMPILER, g++) with OpenMP; where there is none, `load()` says why and callers use
torch's path."""
from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..model.config import cache_dir

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
HEADERS = [Path(__file__).with_name(h) for h in ("cpu_tiles.h", "cpu_pool.h", "cpu_quant.h", "cpu_dot.h")]
FLAGS = ["-O3", "-std=c++20", "-fopenmp", "-pthread", "-shared", "-fPIC", "-Wno-psabi"]
COMPILER = "g++"
NATIVE = "native"             # -march for the runtime's build; tests also build a baseline one (no AVX-512, no AMX)
DTYPES = {torch.float32: 0, torch.bfloat16: 1}


class KernelUnavailable(RuntimeError):
    """The native kernel could not be built or loaded on this machine."""


def _cpu_model() -> str:
    """The first CPU's model name and flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
    except OSError:
        return ""
    return "\n".join(line for line in lines if line.startswith(("model name", "flags")))


def library_path(march: str = NATIVE) -> Path:
    texts = [f.read_text() for f in [SOURCE, *HEADERS]]
    machine = _cpu_model() if march == NATIVE else ""
    key = hashlib.sha256("\n".join([*texts, COMPILER, *FLAGS, march, machine]).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"cpu_kernel-{key}.so"


def build(path: Path, march: str = NATIVE, source: Path = SOURCE) -> Path:
    """Compile the kernel (`source`, its headers beside it) for `-march=<march>` into `path` (atomically: concurrent
    builders never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        res = subprocess.run([COMPILER, *FLAGS, f"-march={march}", str(source), "-o", tmp], capture_output=True,
                             text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        os.unlink(tmp)
        raise KernelUnavailable(f"cannot run the C++ compiler {COMPILER!r}: {e}") from None
    if res.returncode != 0:
        os.unlink(tmp)
        raise KernelUnavailable(f"{COMPILER} failed to build {SOURCE.name}: {res.stderr.strip()[-600:]}")
    os.replace(tmp, path)
    return path


def load(march: str = NATIVE, path: Path | None = None) -> ctypes.CDLL:
    """The kernel library for `-march=<march>`, built first if this machine has none (or the library at `path`,
    built already); raises KernelUnavailable."""
    path = path or library_path(march)
    if not path.exists():
        build(path, march)
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise KernelUnavailable(f"cannot load {path}: {e}") from None
    P = ctypes.c_void_p
    lib.moe_cpu_experts.argtypes = [ctypes.c_int, ctypes.c_int, P, P, P, P, P, P, P, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int, P, P, P, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.moe_cpu_experts.restype = ctypes.c_int
    lib.moe_pool_start.argtypes = [ctypes.c_int, ctypes.c_long] + lib.moe_cpu_experts.argtypes
    lib.moe_pool_start.restype = ctypes.c_int
    lib.moe_pool_wait.restype = ctypes.c_long
    lib.moe_pool_threads.restype = ctypes.c_int
    lib.moe_pool_park.restype = None
    lib.moe_pool_limit.argtypes = [ctypes.c_int]
    lib.moe_pool_limit.restype = None
    lib.moe_pool_join_above.argtypes = [ctypes.c_int]
    lib.moe_pool_join_above.restype = ctypes.c_int
    lib.moe_cpu_threads.restype = ctypes.c_int
    lib.moe_tiles.restype = ctypes.c_int
    lib.moe_dot.restype = ctypes.c_int
    lib.moe_dot_layouts.argtypes = [ctypes.c_int] * 8
    lib.moe_dot_layouts.restype = ctypes.c_int
    lib.moe_set_prefetch.argtypes = [ctypes.c_int]
    lib.moe_set_prefetch.restype = None
    return lib


if __name__ == "__main__":                 # the install step: a missing compiler is a warning, not a failure
    try:
        lib_path = library_path()
        print(f"CPU expert kernel: {build(lib_path) if not lib_path.exists() else lib_path}")
    except KernelUnavailable as err:
        print(f"warning: CPU expert kernel not built ({err}); the runtime will use torch's CPU path", file=sys.stderr)

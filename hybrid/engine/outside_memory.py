"""What an engine leaves on the GPU outside torch's caching allocator, remembered per machine and setting, so that
the next start's memory plan counts it.

The memory plan counts the CUDA context as measured at start. After it, kernel modules load on first use and every
captured CUDA graph's executable takes device memory the allocator never sees: on the H200 box a server at 8 GiB
(decode graphs for batch sizes 1-16) grew ~0.5 GiB past its start's context and peaked at 8.32-8.40 GiB, and run.py's
cells at 6 and 4 GiB peaked at 6.07 and 4.06 (~0.25 GiB grown, the fifteenth lease). Each run and each server
warm-up measures that growth and stores the largest seen for its setting; later starts with the same setting and a
budget reserve it in the plan (as part of the context), so their expert cache is smaller by that much and the peak
stays within --gpu-memory. A first start on a GPU reserves an estimate made from the fourteenth lease's measurement
(first_start)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.config import RunConfig, cache_dir
from ..offload.runtime import outside_allocator_bytes

FILE = "outside-memory.json"
MODULES_BYTES = 256 * 2**20     # kernel modules loaded after the start: 0.25 GiB on the H200 box (fourteenth lease)
GRAPH_BYTES = 160 * 2**10       # one captured graph's executable: ~157 KB there (1,615 decode graphs, 0.242 GiB)
GRAPHS_PER_BATCH = 64           # decode graphs a batch size captures offloading, at most (V2-Lite: ~27 pieces and a
                                # few layer graphs); all resident (mode gpu), a whole step is one graph
SHAPING = ("device", "dtype", "mode", "experts", "cache_layout", "prefetch", "max_batch_size", "max_seq_len",
           "cuda_graphs", "static_decode")     # the run fields that decide which graphs and kernels a warm-up makes


def setting_key(model: str, run: RunConfig, gpu: str, torch_version: str) -> str:
    """The machine's GPU and torch, the checkpoint, and the run fields that shape the graphs (not the budget: a
    start with a smaller --gpu-memory captures the same graphs)."""
    fields = ",".join(f"{name}={getattr(run, name)}" for name in SHAPING)
    return f"{gpu}|torch {torch_version}|{Path(model).resolve()}|{fields}"


def _path() -> Path:
    return cache_dir() / FILE


def _read() -> dict:
    try:
        data = json.loads(_path().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _stored(data: dict, key: str) -> int:
    value = data.get(key, 0)
    return int(value) if isinstance(value, (int, float)) and value > 0 else 0


def reserved(key: str) -> int:
    """Bytes to reserve for the setting: its largest measured growth, 0 if none was stored."""
    return _stored(_read(), key)


def first_start(run: RunConfig) -> int:
    """A first start's reserve on a GPU, before this machine has measured the setting: the modules, and the decode
    graphs of every batch size up to the run's largest (mode auto counts as offloading)."""
    per_batch = 1 if run.mode == "gpu" else GRAPHS_PER_BATCH
    return MODULES_BYTES + run.max_batch_size * per_batch * GRAPH_BYTES


@dataclass(frozen=True)
class Outside:
    """An engine's plan for memory outside the allocator: its setting's key, the bytes reserved, and whether they
    were measured here (else first_start's estimate, or asked for)."""
    key: str
    reserve: int
    measured: bool

    def note(self) -> str:
        """One line on what the plan reserved, or "" when nothing."""
        if not self.reserve:
            return ""
        what = "that this setting grew here before" if self.measured else \
            "estimated (the first start with this setting here measures it for the next) to grow"
        return (f"memory: the context includes {self.reserve / 2**20:.0f} MiB {what} outside torch's allocator "
                "(kernel modules, graph executables)")


def plan(model: str, run: RunConfig, device: torch.device, asked: int | None = None) -> Outside:
    """The reserve of an engine on `device`: `asked` if given, else with a budget `reserve`'s, else none."""
    gpu = device.type == "cuda"
    key = setting_key(model, run, torch.cuda.get_device_name(device) if gpu else "none", torch.__version__)
    if asked is not None:
        return Outside(key, asked, False)
    if run.gpu_memory is None:
        return Outside(key, 0, True)
    return Outside(key, *reserve(key, run, gpu))


def reserve(key: str, run: RunConfig, gpu: bool) -> tuple[int, bool]:
    """-> (bytes the plan reserves for the setting, whether they were measured): the stored growth, else on a GPU
    first_start's estimate, else none (a CPU device grows nothing outside an allocator)."""
    stored = reserved(key)
    if stored or not gpu:
        return stored, True
    return first_start(run), False


def remember(key: str, growth: int) -> bool:
    """Store the setting's measured growth (bytes past the start's context) where it is the largest seen (a run
    with shorter prompts captures fewer graphs). -> whether it is stored (a cache folder that cannot be written
    costs the next start its reserve, not this run)."""
    data = _read()
    if int(growth) <= _stored(data, key):
        return True
    data[key] = int(growth)
    path = _path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        return False
    return True


def measure(key: str, device: torch.device, context_start: int) -> int:
    """After a run: the device memory outside the allocator now (it only grows: kernel modules, graphs), its growth
    past the start's context remembered for the setting. -> those bytes."""
    outside = max(context_start, outside_allocator_bytes(device))
    remember(key, outside - context_start)
    return outside

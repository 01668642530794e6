"""What a server's warm-up leaves on the GPU outside torch's caching allocator, remembered per machine and setting,
so that the next start's memory plan counts it.

The memory plan counts the CUDA context as measured at start. After it, kernel modules load on first use and every
captured CUDA graph's executable takes device memory the allocator never sees: on the H200 box a server at 8 GiB
(decode graphs for batch sizes 1-16) grew ~0.5 GiB past its start's context and peaked at 8.32-8.40 GiB. The first
start with a setting measures that growth after its warm-up and stores it; later starts with the same setting
reserve it in the plan (as part of the context), so their expert cache is smaller by that much and the peak stays
within --gpu-memory. The stored figure is replaced by each start's measurement. A first start on a GPU reserves an
estimate made from the fourteenth lease's measurement (first_start)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..model.config import RunConfig, cache_dir

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


def reserved(key: str) -> int:
    """Bytes to reserve for the setting: its last measured growth, 0 if none was stored."""
    value = _read().get(key, 0)
    return int(value) if isinstance(value, (int, float)) and value > 0 else 0


def first_start(run: RunConfig) -> int:
    """A first start's reserve on a GPU, before this machine has measured the setting: the modules, and the decode
    graphs of every batch size up to the run's largest (mode auto counts as offloading)."""
    per_batch = 1 if run.mode == "gpu" else GRAPHS_PER_BATCH
    return MODULES_BYTES + run.max_batch_size * per_batch * GRAPH_BYTES


def reserve(key: str, run: RunConfig, gpu: bool) -> tuple[int, bool]:
    """-> (bytes the plan reserves for the setting, whether they were measured): the stored growth, else on a GPU
    first_start's estimate, else none (a CPU device grows nothing outside an allocator)."""
    stored = reserved(key)
    if stored or not gpu:
        return stored, True
    return first_start(run), False


def remember(key: str, growth: int) -> bool:
    """Store the setting's measured growth (bytes past the start's context), replacing the last one. -> whether it
    was stored (a cache folder that cannot be written costs the next start its reserve, not this server its run)."""
    data = _read()
    data[key] = max(0, int(growth))
    path = _path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        return False
    return True

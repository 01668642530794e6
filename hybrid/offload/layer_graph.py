"""The GPU side of one offloaded MoE layer at decode, as three CUDA graphs around the CPU experts.

Rows are sorted [hits | fetched | CPU] once. `hits` loads the layout from page-locked host memory, gathers the rows
and runs the cached experts at once; `fetched` runs the experts being copied in, queued behind their copies; `post`
takes the CPU experts' rows from page-locked host memory, picks each row's result and combines. Both grouped GEMMs
take every row (fixed shapes, so they can be captured): the hits GEMM stops after the hit rows, and the fetched
GEMM's offsets start past them, so the hit rows fall to the first slot there and are discarded. The host buffers
are read by the GPU itself (kernels/host_read.py), not copied in through the copy engine, whose queue holds the
expert copies. On a CPU device all of it runs eagerly."""
from __future__ import annotations

import numpy as np
import torch

from ..kernels import host_read


_WARM_STREAMS: dict[int, torch.cuda.Stream] = {}


def warm_stream() -> torch.cuda.Stream:
    """The one side stream on which every graph's warm-up pass runs, on the current device. torch keeps a cuBLAS
    workspace (32 MiB on the H200) for each stream that ran a matmul, for the life of the process: with a fresh
    stream per capture (up to torch's pool of 32), a server capturing every batch size would hold up to 1 GiB of
    them outside its memory plan."""
    dev = torch.cuda.current_device()
    if dev not in _WARM_STREAMS:
        _WARM_STREAMS[dev] = torch.cuda.Stream()
    return _WARM_STREAMS[dev]


def combine(x: torch.Tensor, tok: torch.Tensor, ys: torch.Tensor, wsort: torch.Tensor) -> torch.Tensor:
    """Sum each token's expert outputs ys [T*K, Hd] (sorted rows, token tok [T*K]) weighted by wsort [T*K, 1]."""
    return torch.zeros_like(x).index_add_(0, tok, (ys * wsort).to(x.dtype))


class HostRows:
    """A layer graph's page-locked host side for R rows: the layout `index` (int32 [R + 2S + 2]) and the CPU
    experts' rows `cpu` ([R, Hd]). Kept by the executor per R and shared by every layer's graphs: the host writes
    a layer's only after that layer's routing sync, which follows the previous layer's graphs on the stream."""

    def __init__(self, R: int, n_slots: int, hidden: int, dtype: torch.dtype, pin: bool):
        self.index = torch.zeros(R + 2 * n_slots + 2, dtype=torch.int32, pin_memory=pin)
        self.index_np = self.index.numpy()
        self.cpu = torch.zeros(R, hidden, dtype=dtype, pin_memory=pin)                             # [R, Hd]


class LayerGraph:
    """index (int32, loaded from the host's per call): [perm (R) | hit offsets (S) | fetched offsets (S) | hit
    rows (1) | first CPU row (1)], R = T*K rows, S slots; the CPU experts' rows come from `host.cpu`, in order."""

    def __init__(self, call, ffn, n_slots: int, host: HostRows, capture: bool, pool=None):
        T, K = call.idx.shape
        self.call, self.K, self.R, self.S = call, K, T * K, n_slots
        self.ffn = ffn                       # the grouped FFN over every common slot in the layer's layout
        self.host = host
        dev = call.x.device
        self.index = torch.zeros(host.index.shape[0], dtype=torch.int32, device=dev)
        self.row = torch.arange(self.R, dtype=torch.int32, device=dev)[:, None]            # [R, 1]
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture(pool)

    def _hits(self) -> None:
        R, S = self.R, self.S
        host_read.load(self.index, self.host.index)
        perm = self.index[:R].long()                                                        # [R]
        self.tok = perm // self.K
        self.xs = self.call.x.index_select(0, self.tok)                                     # [R, Hd]
        self.wsort = self.call.w.reshape(-1)[perm].unsqueeze(1)                             # [R, 1]
        self.ys_hit = self.ffn(self.xs, self.index[R:R + S])                               # [R, Hd]

    def _fetched(self) -> None:
        R, S = self.R, self.S
        self.ys = self.ffn(self.xs, self.index[R + S:R + 2 * S])                           # [R, Hd]

    def _post(self) -> None:
        ys = torch.where(self.row < self.index[-2:-1], self.ys_hit, self.ys)                # [R, Hd]
        host_read.merge_rows(ys, self.host.cpu, self.index[-1:])
        self.out = combine(self.call.x, self.tok, ys, self.wsort)                          # [T, Hd]

    def _capture(self, pool) -> None:
        side = warm_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._hits()
            self._fetched()
            self._post()
        torch.cuda.current_stream().wait_stream(side)
        for name, fn in (("hits", self._hits), ("fetched", self._fetched), ("post", self._post)):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                fn()
            self.graphs[name] = g

    def _run(self, name: str, fn) -> None:
        if self.graphs:
            self.graphs[name].replay()
        else:
            fn()

    def hits(self, perm: np.ndarray, hit_offs: np.ndarray, fetched_offs: np.ndarray, hit_rows: int,
             cpu_start: int) -> None:
        """Write the layout to host memory, then load it, gather the rows and run the cached experts (the graph
        of the layer's previous call has run: the host has seen routings queued after it)."""
        R, S, a = self.R, self.S, self.host.index_np
        a[:R], a[R:R + S], a[R + S:R + 2 * S], a[-2], a[-1] = perm, hit_offs, fetched_offs, hit_rows, cpu_start
        self._run("hits", self._hits)

    def fetched(self, any_fetched: bool = True) -> None:
        """Run the fetched experts (queue this after their copies). With nothing fetched a captured graph skips
        the GEMM."""
        if any_fetched or not self.graphs:
            self._run("fetched", self._fetched)

    def post(self) -> torch.Tensor:
        """Once the CPU experts' rows are in `host.cpu`: pick each row's result and combine -> [T, Hd]."""
        self._run("post", self._post)
        return self.out


class LayerGraphs:
    """The decode layer graphs, one set per static step's MoE buffers and expert layout, shared by every offloaded
    layer of the step (engine/graphs.StaticStep._shared gives them one set of addresses): captured on a GPU, run
    eagerly elsewhere; built per call for calls not from a static step. Host buffers kept per row count."""

    def __init__(self, ffn, n_slots: int, hidden: int, cuda: bool, capture: bool = True):
        """capture: on CUDA, capture the graphs (else run them eagerly: --cuda-graphs off)."""
        self.ffn, self.n_slots, self.hidden, self.cuda = ffn, n_slots, hidden, cuda
        self.capture = cuda and capture
        self.captured: dict[tuple, LayerGraph] = {}        # (the step's MoE input buffer, layout) -> its graphs
        self.host: dict[int, HostRows] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    def __call__(self, call) -> LayerGraph:
        R = call.idx.numel()
        if R not in self.host:
            self.host[R] = HostRows(R, self.n_slots, self.hidden, call.x.dtype, self.cuda)
        if not call.static:
            return LayerGraph(call, self.ffn(call.layer), self.n_slots, self.host[R], capture=False)
        key = (call.x.data_ptr(), self.ffn.layout_of(call.layer))
        if key not in self.captured:
            self.captured[key] = LayerGraph(call, self.ffn(call.layer), self.n_slots, self.host[R], self.capture,
                                            self.pool)
        return self.captured[key]

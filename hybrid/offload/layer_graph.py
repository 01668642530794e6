"""The GPU side of one offloaded MoE layer at decode, as three CUDA graphs around the CPU experts.

Rows are sorted [hits | fetched | CPU] once. `hits` gathers the rows and runs the cached experts at once;
`fetched` runs the experts being copied in, queued behind their copies; `post` picks each row's result and
combines. Both grouped GEMMs take every row (fixed shapes, so they can be captured): the hits GEMM stops after
the hit rows, and the fetched GEMM's offsets start past them, so the hit rows fall to the first slot there and
are discarded. CPU results overwrite the rows past the fetched ones. On a CPU device all of it runs eagerly."""
from __future__ import annotations

import torch


def combine(x: torch.Tensor, tok: torch.Tensor, ys: torch.Tensor, wsort: torch.Tensor) -> torch.Tensor:
    """Sum each token's expert outputs ys [T*K, Hd] (sorted rows, token tok [T*K]) weighted by wsort [T*K, 1]."""
    return torch.zeros_like(x).index_add_(0, tok, (ys * wsort).to(x.dtype))


class LayerGraph:
    """index (int32, filled from pinned host memory per call): [perm (R) | hit offsets (S) | fetched offsets (S) |
    hit rows (1)], R = T*K rows, S slots."""

    def __init__(self, call, ffn, n_slots: int, capture: bool, pool=None):
        T, K = call.idx.shape
        self.call, self.K, self.R, self.S = call, K, T * K, n_slots
        self.ffn = ffn                       # the grouped FFN over every slot (ExpertCache.grouped)
        dev = call.x.device
        self.index = torch.zeros(self.R + 2 * self.S + 1, dtype=torch.int32, device=dev)
        self.row = torch.arange(self.R, dtype=torch.int32, device=dev)[:, None]            # [R, 1]
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture(pool)

    def _hits(self) -> None:
        R, S = self.R, self.S
        perm = self.index[:R].long()                                                        # [R]
        self.tok = perm // self.K
        self.xs = self.call.x.index_select(0, self.tok)                                     # [R, Hd]
        self.wsort = self.call.w.reshape(-1)[perm].unsqueeze(1)                             # [R, 1]
        self.ys_hit = self.ffn(self.xs, self.index[R:R + S])                               # [R, Hd]

    def _fetched(self) -> None:
        R, S = self.R, self.S
        self.ys = self.ffn(self.xs, self.index[R + S:R + 2 * S])                           # [R, Hd]

    def _post(self) -> None:
        ys = torch.where(self.row < self.index[-1:], self.ys_hit, self.ys)                  # [R, Hd]
        self.out = combine(self.call.x, self.tok, ys, self.wsort)                          # [T, Hd]

    def _capture(self, pool) -> None:
        side = torch.cuda.Stream()
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

    def hits(self, index: torch.Tensor) -> None:
        """Load the layout (from pinned host memory), gather the rows and run the cached experts."""
        self.index.copy_(index, non_blocking=True)
        self._run("hits", self._hits)

    def fetched(self, any_fetched: bool = True) -> torch.Tensor:
        """Run the fetched experts (queue this after their copies); -> the buffer whose CPU rows the caller fills.
        With nothing fetched a captured graph skips the GEMM (its buffer is still there for the CPU rows)."""
        if any_fetched or not self.graphs:
            self._run("fetched", self._fetched)
        return self.ys

    def post(self) -> torch.Tensor:
        self._run("post", self._post)
        return self.out

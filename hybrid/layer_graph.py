"""The GPU side of one offloaded MoE layer at decode, as two CUDA graphs around the CPU experts.

Every routed row goes through one grouped GEMM over the cache slots (the CPU rows ride along in the last slot and
their results are overwritten), so the shapes are fixed per batch size and the work can be captured:
`pre` gathers the rows, runs the experts and sorts the routing weights; `post` weights and combines them.
Replaying two graphs replaces ~25 kernel launches from Python per layer. On a CPU device both run eagerly."""
from __future__ import annotations

import torch

from .experts import grouped_ffn


def combine(x: torch.Tensor, tok: torch.Tensor, ys: torch.Tensor, wsort: torch.Tensor) -> torch.Tensor:
    """Sum each token's expert outputs ys [T*K, Hd] (sorted rows, token tok [T*K]) weighted by wsort [T*K, 1]."""
    return torch.zeros_like(x).index_add_(0, tok, (ys * wsort).to(x.dtype))


class LayerGraph:
    def __init__(self, call, w13_all: torch.Tensor, w2_all: torch.Tensor, capture: bool, pool=None):
        T, K = call.idx.shape
        self.call, self.K, self.rows = call, K, T * K
        self.w13, self.w2 = w13_all, w2_all
        self.index = torch.zeros(T * K + w13_all.shape[0], dtype=torch.int32, device=call.x.device)
        self.graphs: list[torch.cuda.CUDAGraph] = []
        if capture:
            self._capture(pool)

    def _pre(self) -> None:
        perm = self.index[:self.rows].long()                                              # [T*K]
        self.tok = perm // self.K
        xs = self.call.x.index_select(0, self.tok)                                        # [T*K, Hd]
        self.ys = grouped_ffn(xs, self.index[self.rows:], self.w13, self.w2)              # [T*K, Hd]
        self.wsort = self.call.w.reshape(-1)[perm].unsqueeze(1)                           # [T*K, 1]

    def _post(self) -> None:
        self.out = combine(self.call.x, self.tok, self.ys, self.wsort)                   # [T, Hd]

    def _capture(self, pool) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._pre()
            self._post()
        torch.cuda.current_stream().wait_stream(side)
        for fn in (self._pre, self._post):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                fn()
            self.graphs.append(g)

    def pre(self, index: torch.Tensor) -> torch.Tensor:
        """Load the layout (perm then slot offsets, from pinned host memory) and run the GPU experts; -> ys."""
        self.index.copy_(index, non_blocking=True)
        if self.graphs:
            self.graphs[0].replay()
        else:
            self._pre()
        return self.ys

    def post(self) -> torch.Tensor:
        if self.graphs:
            self.graphs[1].replay()
        else:
            self._post()
        return self.out

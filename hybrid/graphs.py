"""Decode steps from static buffers, replayed from CUDA graphs.

With a resident backend (mode gpu) the whole step is one graph. With an offloading backend, the step is cut at each
MoE layer's routing (where the host must see the routing to plan): the pieces in between are graphs, and the
expert work runs eagerly between replays. On a CPU device the same static step runs eagerly (no capture)."""
from __future__ import annotations

import torch

from .model import DeepseekV2, LatentCache, MoECall, StepState


class StaticStep:
    """Input buffers for a batch size, and the captured pieces that read them."""

    def __init__(self, model: DeepseekV2, cache: LatentCache, batch: int, device, capture: bool):
        self.model, self.cache = model, cache.batch(batch)
        cap = cache.capacity
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.st = StepState(0, torch.zeros(batch, 1, dtype=torch.long, device=device),
                            torch.zeros(batch, 1, 1, cap, dtype=torch.float32, device=device), None,
                            kv_len=cap, write_index=torch.zeros(1, dtype=torch.long, device=device))
        self.capture = capture
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.calls: list[MoECall] = []
        self.routed: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None

    def load(self, tok: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, start: int) -> None:
        self.ids.copy_(tok[:, None])
        self.st.positions.copy_(positions)
        self.st.mask.copy_(mask)
        self.st.write_index.fill_(start)

    def _drive(self, answer) -> torch.Tensor:
        return self.model.forward(self.ids, self.cache, self.st, answer=answer)

    def _capture(self) -> None:
        backend = self.model.experts
        warm = backend.forward if backend.capturable else (lambda c: torch.zeros_like(c.x))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._drive(warm)
        torch.cuda.current_stream().wait_stream(side)
        pool = torch.cuda.graph_pool_handle()
        if backend.capturable:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.logits = self._drive(backend.forward)
            self.pieces = [g]
            return
        gen = self.model.steps(self.ids, self.cache, self.st)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            item = next(gen)
        self.pieces.append(g)
        while isinstance(item, MoECall):
            item.static = True
            self.calls.append(item)
            self.routed.append(torch.zeros_like(item.x))
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                item = gen.send(self.routed[-1])
            self.pieces.append(g)
        self.logits = item

    def run(self) -> torch.Tensor:
        if not self.capture:
            return self._drive(self.model.experts.forward)
        if not self.pieces:
            self._capture()
        self.pieces[0].replay()
        for call, buf, piece in zip(self.calls, self.routed, self.pieces[1:]):
            buf.copy_(self.model.experts.forward(call))
            piece.replay()
        return self.logits


class DecodeRunner:
    """Keeps one StaticStep per batch size over the engine's persistent latent cache."""

    def __init__(self, model: DeepseekV2, cache: LatentCache, device, capture: bool):
        self.model, self.cache, self.device, self.capture = model, cache, device, capture
        self.steps: dict[int, StaticStep] = {}

    def __call__(self, tok: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
        B = tok.shape[0]
        if B not in self.steps:
            self.steps[B] = StaticStep(self.model, self.cache, B, self.device, self.capture)
        step = self.steps[B]
        step.load(tok, positions, mask, start)
        return step.run()

"""Decode steps and whole-prompt prefills from static buffers, replayed from CUDA graphs.

With a resident backend (mode gpu) the whole step is one graph. With an offloading backend, the step is cut at each
MoE layer's routing (where the host must see the routing to plan): the pieces in between are graphs, and the
expert work runs eagerly between replays. On a CPU device the same static step runs eagerly (no capture).

A prefill of T tokens launches ~60 small kernels between two MoE layers (attention, router, shared experts): at a
few hundred tokens that host work, not the GPU, sets the gap between one layer's CPU experts and the next layer's
routing. Prompt shapes seen before (a benchmark, fixed-size jobs) replay those pieces from graphs instead."""
from __future__ import annotations

import torch

from ..model.deepseek import DeepseekV2, MoECall, StepState
from ..model.latent_cache import LatentCache
from ..offload.budget import GRAPH_TOKENS_KEPT
from ..offload.layer_graph import warm_stream


class StaticStep:
    """Input buffers for a batch size, and the captured pieces that read them."""

    def __init__(self, model: DeepseekV2, cache: LatentCache, batch: int, device, capture: bool, tokens: int = 1,
                 pool=None):
        self.model, self.cache = model, cache.batch(batch)
        table = model.embed.table
        self.x = torch.zeros(batch, tokens, table.shape[1], dtype=table.dtype, device=device)    # embedded input
        positions = torch.zeros(batch, tokens, dtype=torch.long, device=device)
        if tokens == 1:         # decode: attends over the whole cache, writes the slot `load` names
            cap = cache.capacity
            self.st = StepState(0, positions, torch.zeros(batch, 1, 1, cap, dtype=torch.float32, device=device),
                                None, kv_len=cap, write_index=torch.zeros(1, dtype=torch.long, device=device))
        else:                   # prefill: a whole prompt of `tokens` from slot 0, every token real
            self.st = StepState(0, positions, torch.zeros(batch, 1, tokens, tokens, dtype=torch.float32,
                                                          device=device), None, kv_len=tokens)
        self.capture, self.pool = capture, pool
        self.pieces: list[torch.cuda.CUDAGraph] = []
        self.calls: list[MoECall] = []
        self.guesses: list[torch.cuda.CUDAGraph | None] = []     # per MoE call: its backend's guess, if it makes one
        self.routed: torch.Tensor | None = None     # every layer's routed output, read by the piece after it
        self.logits: torch.Tensor | None = None
        self.moe: list | None = None                # every offloaded layer's x, idx, w, pred (or None): _shared
        self.shared: dict[int, MoECall] = {}        # layer -> its MoE call over those buffers

    def load(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, start: int = 0) -> None:
        """ids, positions [B, T]; mask as StepState.mask; start: the cache slot written (decode only)."""
        self.model.embed(ids, out=self.x)
        self.st.positions.copy_(positions)
        self.st.mask.copy_(mask)
        if self.st.write_index is not None:
            self.st.write_index.fill_(start)

    def _drive(self, answer) -> torch.Tensor:
        return self.model.run(self.x, self.cache, self.st, answer=answer)

    def _in_graph(self, item) -> bool:
        """Whether `item` is a MoE call the backend answers without the host (a pinned layer)."""
        in_graph = getattr(self.model.experts, "in_graph", None)
        return isinstance(item, MoECall) and in_graph is not None and in_graph(item)

    def _shared(self, call: MoECall) -> MoECall:
        """The layer's call over the step's own MoE buffers, filled from `call`'s (inside the piece being captured,
        or now when eager): every offloaded layer of the step reads the same addresses, so one set of layer graphs
        (offload/layer_graph.py) serves them all, where a set per layer held ~0.4 GiB of a server's 8 (graph
        executables and their buffers at every batch size, the fourteenth lease). One call object per layer."""
        if self.moe is None:
            self.moe = [torch.empty_like(t) for t in (call.x, call.idx, call.w)] + [None]
        if call.pred is not None and self.moe[3] is None:
            self.moe[3] = torch.empty_like(call.pred)
        for dst, src in zip(self.moe, (call.x, call.idx, call.w, call.pred)):
            if src is not None:
                dst.copy_(src)
        if call.layer not in self.shared:
            x, idx, w, pred = self.moe
            self.shared[call.layer] = MoECall(call.layer, x, idx, w, pred if call.pred is not None else None,
                                              static=True)
        return self.shared[call.layer]

    def _answer(self, call: MoECall) -> torch.Tensor:
        """An eager step's MoE call: the backend's guess (offloaded decode), then its answer."""
        if self._in_graph(call):
            return self.model.experts.forward(call)
        if not self.model.experts.capturable:            # an offloading backend: its layer graphs are shared
            call = self._shared(call)
        guesses = getattr(self.model.experts, "guesses", None)
        wanted = guesses is not None and guesses.wanted(call)
        self._before(call, (lambda: guesses.run(call)) if wanted else None)
        return self.model.experts.forward(call)

    def _before(self, call: MoECall, guess) -> None:
        """Ahead of an offloading backend's forward: its routing sync queued, then the `guess` (a callable, or None)
        behind the prefetch copies its slot table's entries await, which the host need not wait for."""
        backend = self.model.experts
        if hasattr(backend, "readback"):
            backend.readback(call)
        if guess is not None:
            backend.guesses.wait_copies()
            guess()

    def _capture(self) -> None:
        backend = self.model.experts
        warm = backend.forward if backend.capturable else backend.warm
        side = warm_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._drive(warm)
        torch.cuda.current_stream().wait_stream(side)
        pool = self.pool or torch.cuda.graph_pool_handle()
        if backend.capturable:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self.logits = self._drive(backend.forward)
            self.pieces = [g]
            return
        gen = self.model.steps(self.x, self.cache, self.st)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            item = self._through(gen, next(gen))
        self.pieces.append(g)
        guesses = getattr(backend, "guesses", None)
        while isinstance(item, MoECall):
            self.calls.append(item)
            wanted = guesses is not None and guesses.wanted(item)
            self.guesses.append(self._capture_guess(guesses.run, item, pool) if wanted else None)
            if self.routed is None:
                self.routed = torch.zeros_like(item.x)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                item = self._through(gen, gen.send(self.routed))
            self.pieces.append(g)
        self.logits = item

    def _through(self, gen, item):
        """Answer the pinned layers' calls in the piece being captured, up to the next call the host must see
        (over the step's shared buffers)."""
        while self._in_graph(item):
            item = gen.send(self.model.experts.forward(item))
        return self._shared(item) if isinstance(item, MoECall) else item

    @staticmethod
    def _capture_guess(guess, call: MoECall, pool) -> torch.cuda.CUDAGraph:
        side = warm_stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            guess(call)                                       # warm-up: Triton compiles, the allocator settles
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            guess(call)
        return g

    def run(self) -> torch.Tensor:
        if not self.capture:
            return self._drive(self._answer)
        if not self.pieces:
            self._capture()
        self.pieces[0].replay()
        for call, guess, piece in zip(self.calls, self.guesses, self.pieces[1:]):
            self._before(call, guess and guess.replay)
            self.routed.copy_(self.model.experts.forward(call))
            piece.replay()
        return self.logits


class DecodeRunner:
    """Keeps one StaticStep per batch size over the engine's persistent latent cache. The steps share one graph
    pool: a server meets every batch size up to its maximum, and a pool each would hold their sum. Sharing is safe
    as the steps run one at a time and each step's outputs are read before the next runs (the offloaded layers'
    graphs share theirs across batch sizes the same way: layer_graph.LayerGraphs)."""

    def __init__(self, model: DeepseekV2, cache: LatentCache, device, capture: bool):
        self.model, self.cache, self.device, self.capture = model, cache, device, capture
        self.steps: dict[int, StaticStep] = {}
        self.pool = torch.cuda.graph_pool_handle() if capture else None

    def __call__(self, tok: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
        B = tok.shape[0]
        if B not in self.steps:
            self.steps[B] = StaticStep(self.model, self.cache, B, self.device, self.capture, pool=self.pool)
        step = self.steps[B]
        step.load(tok[:, None], positions, mask, start)
        return step.run()


class PrefillRunner:
    """Whole-prompt prefills (one chunk from slot 0, no padding) from static buffers, for prompt shapes
    [B, T] seen before: the first prefill of a shape runs eagerly (most prompt lengths never repeat, and a
    capture costs a few eager passes), the second captures, later ones replay. The steps share one graph
    pool, whose live buffers (each MoE layer's input, ~T x hidden) stay allocated: shapes of more than
    `max_tokens` tokens, or past GRAPH_TOKENS_KEPT x that over all kept shapes, stay eager."""

    def __init__(self, model: DeepseekV2, cache: LatentCache, device, capture: bool, max_tokens: int):
        self.model, self.cache, self.device, self.capture = model, cache, device, capture
        self.max_tokens, self.total_tokens = max_tokens, GRAPH_TOKENS_KEPT * max_tokens     # as budget reserves
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.seen: set[tuple[int, int]] = set()
        self.steps: dict[tuple[int, int], StaticStep] = {}

    def _step(self, B: int, T: int) -> StaticStep | None:
        key, n = (B, T), B * T
        if key in self.steps:
            return self.steps[key]
        used = sum(b * t for b, t in self.steps)
        if key not in self.seen or T < 2 or n > self.max_tokens or used + n > self.total_tokens:
            self.seen.add(key)
            return None
        self.steps[key] = StaticStep(self.model, self.cache, B, self.device, self.capture, tokens=T, pool=self.pool)
        return self.steps[key]

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        """ids, positions [B, T], mask [B, 1, T, T] -> last-position logits [B, V], or None: run it eagerly."""
        step = self._step(*ids.shape)
        if step is None:
            return None
        step.load(ids, positions, mask)
        return step.run()

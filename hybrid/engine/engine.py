"""The engine: loads a checkpoint onto a device with an expert runtime, then prefills and decodes batches."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from typing import Callable

import torch
from tqdm import tqdm

from ..kernels.cpu_load import core_watch, default_threads
from ..kernels.quant_gpu import QuantizedFFN, QuantizedLinear
from ..model.gguf_checkpoint import open_checkpoint
from ..model.config import RunConfig
from ..model.deepseek import DeepseekV2, StepState
from ..model.latent_cache import LatentCache
from ..model.embedding import EMBED
from ..model.layout import model_specs
from ..offload.mode_choice import concrete_run
from ..offload.runtime import build_backend, cuda_context_bytes, with_workspace
from ..offload.stats import RunStats
from . import outside_memory
from .graphs import DecodeRunner, PrefillRunner
from .sampling import Sampler, SamplingParams

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NEG = -1e30


class EngineError(RuntimeError):
    """A request or setting the engine cannot honour, with the reason."""


@dataclass
class Generation:
    tokens: list[list[int]]      # new tokens per prompt, up to and including EOS
    stats: RunStats


def additive(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean attention pattern as an additive float32 mask: 0 where allowed, NEG elsewhere."""
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, NEG)


def weight_getter(ckpt, device: torch.device, dtype: torch.dtype, bar,
                  offloading: bool) -> Callable[[str], torch.Tensor]:
    """The model's weights, streamed from the checkpoint (nothing but the model keeps a reference) to the device,
    the token-embedding table to host memory; with `quantized_ffn(layer, "shared" | "dense")`: while offloading
    (memory is what the cache lacks; all resident, the bf16 copies decode faster), a layer's shared experts or dense
    MLP kept in a GGUF file's blocks where they fit a plane kind (GgufCheckpoint.ffn_layout), else None; and so
    `quantized_linear(name)` for attention's projections and the output head (GgufCheckpoint.linear_layout)."""
    def weight(name: str) -> torch.Tensor:
        bar.update()
        t = ckpt.get(name)
        return t.to(dtype=dtype) if name == EMBED else t.to(device, dtype)

    def quantized_ffn(layer: int, which: str) -> QuantizedFFN | None:
        lay = ckpt.ffn_layout(layer, which) if offloading and hasattr(ckpt, "ffn_layout") else None
        if lay is None:
            return None
        bar.update(3)
        return QuantizedFFN(ckpt.ffn_planes(layer, which, lay).to(device), lay)

    def quantized_linear(name: str) -> QuantizedLinear | None:
        mat = ckpt.linear_layout(name) if offloading and hasattr(ckpt, "linear_layout") else None
        if mat is None:
            return None
        bar.update()
        return QuantizedLinear(ckpt.linear_planes(name, mat).to(device), mat)
    weight.quantized_ffn, weight.quantized_linear = quantized_ffn, quantized_linear
    return weight


def resolve_device(name: str) -> torch.device:
    """The device, made the thread's current CUDA device: the engine's events, streams and the driver's copies
    (offload/driver_copy.py) go to the current device's context."""
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {name!r} asked for, but no CUDA GPU is visible: use --device cpu")
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if dev.index is not None and not 0 <= dev.index < n:
            raise EngineError(f"device {name!r} asked for, but the visible GPUs are cuda:0 to cuda:{n - 1}")
        if dev.index is None:                  # "cuda": the current one (set_device wants an index)
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev.index)
    return dev


class Engine:
    def __init__(self, model_dir: str, run: RunConfig | None = None, progress: bool = True, reserve: int | None = None):
        """reserve: device bytes the plan adds to the context for what grows outside torch's allocator later;
        None: with a budget, what this setting grew here before, else on a GPU an estimate (outside_memory.py)."""
        self.run = run or RunConfig()
        self.device = resolve_device(self.run.device)
        self.dtype = DTYPES[self.run.dtype]
        self.ckpt = open_checkpoint(model_dir)
        self.cfg = self.ckpt.config
        self.ckpt.check_shapes(model_specs(self.cfg))
        if self.run.experts == "auto":         # a GGUF's own block format, moved in as it is; else bf16
            self.run = replace(self.run, experts=self.ckpt.native_format())
        self.context_start = cuda_context_bytes(self.device) if self.device.type == "cuda" else 0
        self.outside = outside_memory.plan(model_dir, self.run, self.device, reserve)
        self.context_bytes = self.context_start + self.outside.reserve      # the plan's count outside the allocator
        self.most_threads = self.run.cpu_threads or default_threads(self.device.type == "cuda")
        torch.set_num_threads(self.most_threads)
        self.run, self.mode_note = concrete_run(self.cfg, self.run, self.device, self.dtype.itemsize,
                                                self.context_bytes, self.ckpt)      # the note: what auto chose, why
        self.run = with_workspace(self.cfg, self.run, self.device, self.dtype.itemsize, self.context_bytes)
        self.backend = build_backend(self.cfg, self.ckpt, self.run, self.device, self.dtype, progress,
                                     self.context_bytes)
        names = model_specs(self.cfg, experts=False)
        bar = tqdm(total=len(names), desc="weights -> device", disable=not progress)
        self.model = DeepseekV2(self.cfg, weight_getter(self.ckpt, self.device, self.dtype, bar,
                                                        self.run.weights_in_blocks), self.backend, self.device)
        bar.close()
        if self.run.prefetch == "mlp":
            self.install_predictors(self.run.predictor_path)
        self.recorder = None
        self.watch, self.threads = core_watch(), self.most_threads
        self.cache = LatentCache(self.cfg, self.run.max_batch_size, self.context_len, self.dtype, self.device)
        self.decoder = self.prefiller = None
        if self.run.static_decode:
            capture = self.device.type == "cuda" and self.run.cuda_graphs
            self.decoder = DecodeRunner(self.model, self.cache, self.device, capture)
            if self.run.prefill_graph_tokens > 0:
                self.prefiller = PrefillRunner(self.model, self.cache, self.device, capture,
                                               self.run.prefill_graph_tokens)

    def install_predictors(self, path: str | None) -> None:
        """Use trained k=1 predictors (hybrid.offload.predictor) for the next-layer guesses that drive prefetch."""
        from ..offload import predictor
        path = path or predictor.default_path(self.ckpt.path)
        if not os.path.exists(path):
            raise EngineError(f"--prefetch mlp needs trained predictors for this checkpoint, none at {path}: "
                              "record a trace (run.py --record-trace) and run `python -m hybrid.offload.predictor train`")
        try:
            models = predictor.load(path, predictor.checkpoint_key(self.ckpt.path))
        except ValueError as e:
            raise EngineError(str(e)) from None
        for (L, k), m in models.items():
            if k == 1:
                self.model.next_scores[L] = m.to(self.device)

    def record_trace(self, max_tokens: int = 4096):
        """Record routing traces from now on (eager decode: graphs cannot copy to the host); returns the recorder."""
        from ..offload.trace import TraceRecorder
        self.recorder = TraceRecorder(self.model.experts, max_tokens)
        self.model.experts = self.recorder
        if self.decoder is not None:
            self.decoder = DecodeRunner(self.model, self.cache, self.device, capture=False)
        self.prefiller = None
        return self.recorder

    def fit_threads(self) -> int:
        """Threads for the next step: one fewer per core that other processes keep busy (cpu_load.py)."""
        n = self.watch.threads(self.most_threads)
        if n != self.threads:
            torch.set_num_threads(n)
            self.backend.set_threads(n)
            self.threads = n
        return n

    def _rows(self, valid: torch.Tensor, start: int, T: int) -> None:
        if self.recorder is not None:
            real = valid[:, start:start + T]
            self.recorder.set_rows(torch.arange(real.shape[0])[:, None].expand_as(real)[real].numpy())

    @property
    def context_len(self) -> int:
        return min(self.run.max_seq_len, self.cfg.max_position_embeddings)

    def check_prompts(self, prompts: list[list[int]], max_new: int) -> None:
        """Raise EngineError unless every prompt has tokens in the vocabulary and fits the context and the batch."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise EngineError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts)
        if longest + max_new > self.context_len:
            raise EngineError(f"prompt of {longest} tokens + {max_new} new tokens exceeds the context of "
                              f"{self.context_len} tokens (max_seq_len / max_position_embeddings)")
        if len(prompts) > self.run.max_batch_size:
            raise EngineError(f"batch of {len(prompts)} exceeds max_batch_size {self.run.max_batch_size} "
                              "that the memory budget was planned for")
        bad = [t for p in prompts for t in p if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise EngineError(f"token id {bad[0]} is outside the vocabulary of {self.cfg.vocab_size}")

    def step_state(self, valid: torch.Tensor, pad: torch.Tensor, start: int, T: int) -> StepState:
        """A forward's positions and mask for T tokens written from cache slot `start`: valid [B, cap] bool, the
        slots each row may attend to; pad [B] each row's left padding (both on the host)."""
        t = torch.arange(start, start + T)
        positions = (t[None, :] - pad[:, None]).clamp(min=0)                           # [B, T]
        keys = valid[:, :start + T]                                                      # [B, S]
        causal = torch.arange(start + T)[None, :] <= t[:, None]                         # [T, S]
        mask = additive(keys[:, None, :] & causal[None]).unsqueeze(1)                   # [B, 1, T, S]
        real = valid[:, start:start + T].reshape(-1)
        rows = None if bool(real.all()) else real.nonzero().squeeze(1).to(self.device)
        return StepState(start, positions.to(self.device), mask.to(self.device), rows, kv_len=start + T)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams | None = None,
                 on_tokens: Callable[[list[int]], None] | None = None) -> Generation:
        """Greedy or sampled generation for a batch of token-id prompts (left-padded together). `on_tokens` gets
        each step's tokens as they come; returning False from it ends the generation there."""
        params = params or SamplingParams()
        self.check_prompts(prompts, params.max_new_tokens)
        B, L = len(prompts), max(len(p) for p in prompts)
        cap = self.context_len
        pad = torch.tensor([L - len(p) for p in prompts])
        valid = torch.ones(B, cap, dtype=torch.bool)
        ids = torch.zeros(B, L, dtype=torch.long)
        for b, p in enumerate(prompts):
            valid[b, :pad[b]] = False
            ids[b, pad[b]:] = torch.tensor(p)
        cache = self.cache.batch(B)
        sampler, stats = Sampler(params, self.device), RunStats(self.run.mode, B, L, self.device.type)
        self._reset_peak()
        self.fit_threads()
        self.backend.begin(stats)
        t0 = time.perf_counter()
        chunk = max(1, self.run.prefill_chunk_tokens // B)
        for s in range(0, L, chunk):
            T = min(chunk, L - s)
            self._rows(valid, s, T)
            st = self.step_state(valid, pad, s, T)
            logits = None
            if self.prefiller is not None and T == L and st.rows is None:
                logits = self.prefiller(ids, st.positions, st.mask)
            if logits is None:
                logits = self.model.forward(ids[:, s:s + T], cache, st)
        out: list[list[int]] = [[] for _ in range(B)]
        done = [False] * B
        for step in range(params.max_new_tokens):
            tok = sampler(logits)
            host = tok.tolist()
            now = time.perf_counter()
            if step == 0:
                stats.ttft_s = now - t0
            else:
                stats.step_s.append(now - t0)
            t0 = now
            for b, t in enumerate(host):
                if not done[b]:
                    out[b].append(t)
                    done[b] = params.stop_on_eos and t == self.cfg.eos_token_id
            stats.new_tokens = step + 1
            stopped = on_tokens is not None and on_tokens(host) is False
            if stopped or all(done) or step == params.max_new_tokens - 1:
                break
            self._rows(valid, L + step, 1)
            self.fit_threads()
            logits = self.decode_step(torch.tensor(host), cache, valid, pad, L + step)   # embedded on the host
        self._finish(stats)
        return Generation(out, stats)

    def decode_step(self, tok: torch.Tensor, cache: LatentCache, valid: torch.Tensor, pad: torch.Tensor,
                    start: int) -> torch.Tensor:
        """Each row's token tok [B] written at slot `start` -> next-token logits [B, V] (graphs where it has them)."""
        if self.decoder is None:
            return self.model.forward(tok[:, None], cache, self.step_state(valid, pad, start, 1))
        positions = (start - pad)[:, None]                                               # [B, 1]
        mask = additive(valid & (torch.arange(valid.shape[1]) <= start)[None])         # [B, cap]
        return self.decoder(tok, positions, mask[:, None, None], start)

    def _reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _finish(self, stats: RunStats) -> None:
        self.backend.end(stats)
        if self.device.type == "cuda":
            stats.outside_gpu_bytes = outside_memory.measure(self.outside.key, self.device, self.context_start)
            stats.peak_gpu_bytes = torch.cuda.max_memory_reserved(self.device) + stats.outside_gpu_bytes

    @torch.no_grad()
    def logits(self, prompt: list[int]) -> torch.Tensor:
        """Full-sequence logits [T, V] for one prompt (a single prefill; used by tests and checks)."""
        self.check_prompts([prompt], 0)
        T = len(prompt)
        cache = LatentCache(self.cfg, 1, T, self.dtype, self.device)
        st = self.step_state(torch.ones(1, T, dtype=torch.bool), torch.zeros(1, dtype=torch.long), 0, T)
        ids = torch.tensor([prompt])                                       # embedded on the host
        stats = RunStats(self.run.mode, 1, T, self.device.type)             # its own: the backend's counters of this pass land here
        self.backend.begin(stats)
        out = self.model.forward(ids, cache, st, last_only=False)[0]
        self._finish(stats)
        return out

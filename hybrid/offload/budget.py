"""GPU memory budget: what the non-expert weights, KV cache and workspace take, and how many expert slots fit."""
from __future__ import annotations

from dataclasses import dataclass

from ..model.config import ModelConfig
from ..model.layout import device_weight_numel

GiB, MiB = 2**30, 2**20
MARGIN = 256 * MiB            # allocator rounding and fragmentation, cuBLAS workspaces: with 384, every offloading
                              # run on the H200 box through session 19 peaked >= 0.24 GiB under its budget
UNLIMITED = 1 << 62           # the "budget" of a run without one (a CPU device and no --gpu-memory)


def size(nbytes: float) -> str:
    """Bytes for people: MiB under 1 GiB, GiB above."""
    return f"{nbytes / GiB:.2f} GiB" if nbytes >= GiB else f"{nbytes / MiB:.1f} MiB"


class BudgetError(RuntimeError):
    """The requested memory budget (GPU or host) cannot hold what the run needs."""


@dataclass(frozen=True)
class MemoryPlan:
    budget: int
    context: int          # CUDA context and libraries, outside torch's allocator
    non_expert: int
    kv_cache: int
    workspace: int
    staging: int          # ring of slots for fetched experts that the cache does not keep
    slot_bytes: int
    n_slots: int
    scratch_experts: int = 0   # quantized experts: how many prefill dequantizes at once (in the workspace)

    @property
    def cache_bytes(self) -> int:
        return self.n_slots * self.slot_bytes

    @property
    def allocator_limit(self) -> int:
        """Bytes torch's allocator may reserve: the budget less the context."""
        return self.budget - self.context

    def describe(self, experts: int | None = None) -> str:
        """One line; `experts`: how many routed experts the model has (caps the cache of an unlimited run)."""
        slots = self.n_slots if experts is None else min(self.n_slots, experts)
        parts = (f"context {size(self.context)} + weights {size(self.non_expert)} + KV {size(self.kv_cache)} + "
                 f"workspace {size(self.workspace)}"
                 + (f" (prefill scratch: {self.scratch_experts} experts)" if self.scratch_experts else "")
                 + f" + staging {size(self.staging)} + "
                 f"cache {slots} experts ({size(slots * self.slot_bytes)})")
        head = "no budget (--gpu-memory not set):" if self.budget >= UNLIMITED else f"budget {size(self.budget)} ="
        return f"{head} {parts}"


def workspace_bytes(cfg: ModelConfig, batch: int, seq_len: int, chunk_tokens: int, itemsize: int) -> int:
    """Peak activation memory of one forward, for a prefill chunk of `chunk_tokens` (split over the batch)."""
    q = max(1, min(seq_len, chunk_tokens // batch))           # queries per sequence in one chunk
    T = batch * q
    H, C = cfg.num_attention_heads, cfg.kv_lora_rank
    from ..model.deepseek import ATTN_SCORE_ELEMS
    attn = min(batch * H * q * seq_len, ATTN_SCORE_ELEMS) * (4 * 3 + itemsize) + 2 * batch * H * q * C * itemsize \
        + batch * q * seq_len * 4
    dense = T * cfg.intermediate_size * 3 * itemsize
    moe = T * cfg.num_experts_per_tok * (cfg.hidden_size * 3 + cfg.moe_intermediate_size * 3) * itemsize
    logits = batch * cfg.vocab_size * 4 * 3
    hidden = T * cfg.hidden_size * 8 * itemsize
    return attn + max(dense, moe) + logits + hidden


CHUNK_CHOICES = (4096, 2048, 1024, 512)
GRAPH_CHOICES = (512, 256, 128, 0)
WORKSPACE_SHARE = 16          # an automatic prefill chunk's activations take at most 1/16 of the budget
GRAPH_SHARE = 24              # automatic prefill graphs at most 1/24


def auto_chunk_tokens(cfg: ModelConfig, budget: int, batch: int, seq_len: int, itemsize: int) -> int:
    """The largest prefill chunk (tokens per forward) whose activations fit 1/WORKSPACE_SHARE of `budget`: a
    smaller chunk streams the offloaded experts once more per chunk but leaves the expert cache more slots."""
    fits = [t for t in CHUNK_CHOICES if workspace_bytes(cfg, batch, seq_len, t, itemsize) * WORKSPACE_SHARE <= budget]
    return fits[0] if fits else CHUNK_CHOICES[-1]


def auto_graph_tokens(cfg: ModelConfig, budget: int, itemsize: int) -> int:
    """The largest prefill captured as a graph whose pool fits 1/GRAPH_SHARE of `budget` (0: none)."""
    return next(t for t in GRAPH_CHOICES if prefill_graph_bytes(cfg, t, itemsize) * GRAPH_SHARE <= budget)


GRAPH_TOKENS_KEPT = 2         # captured prefill shapes hold at most this many times the largest one's tokens


def prefill_graph_bytes(cfg: ModelConfig, max_tokens: int, itemsize: int) -> int:
    """The graph pool of captured prefill steps (graphs.PrefillRunner): buffers that stay live (each MoE layer's
    input and routing, over the kept shapes' tokens) and one forward's activations at `max_tokens`."""
    if max_tokens <= 0:
        return 0
    per_token = len(cfg.moe_layers) * (cfg.hidden_size * itemsize + cfg.num_experts_per_tok * 12)
    live = GRAPH_TOKENS_KEPT * max_tokens * per_token
    return live + workspace_bytes(cfg, 1, max_tokens, max_tokens, itemsize)


def plan_memory(cfg: ModelConfig, budget: int, batch: int, seq_len: int, itemsize: int, chunk_tokens: int,
                staging_slots: int, context: int = 0, min_slots: int = 0, margin: int = MARGIN,
                graph_tokens: int = 0, slot_bytes: int | None = None, scratch_expert: int = 0,
                scratch_experts: int | None = None, scratch_max: int = 8, weights: int | None = None) -> MemoryPlan:
    """Split `budget` bytes; raise BudgetError naming what does not fit. graph_tokens: the largest prefill
    captured as a graph, 0 for none; slot_bytes: one expert's bytes (default: unquantized, at itemsize); weights:
    the non-expert weights' bytes on the device (default: all of them at itemsize).
    Quantized slots: prefill dequantizes `scratch_experts` experts of `scratch_expert` bytes at once; None: up to
    scratch_max, as long as the scratch takes at most a quarter of what the cache would otherwise get."""
    from ..model.latent_cache import LatentCache
    non_expert = device_weight_numel(cfg) * itemsize if weights is None else weights
    kv = LatentCache.nbytes(cfg, batch, seq_len, itemsize)
    ws = workspace_bytes(cfg, batch, seq_len, chunk_tokens, itemsize) + margin \
        + prefill_graph_bytes(cfg, graph_tokens, itemsize)
    slot = cfg.expert_numel * itemsize if slot_bytes is None else slot_bytes
    staging = staging_slots * slot
    n_scratch = 0
    if scratch_expert:
        room = max(0, budget - (context + non_expert + kv + ws + staging))
        n_scratch = min(scratch_max, room // (4 * scratch_expert)) if scratch_experts is None else scratch_experts
        ws += n_scratch * scratch_expert
    fixed = context + non_expert + kv + ws + staging
    if budget < fixed + min_slots * slot:
        raise BudgetError(
            f"GPU memory budget {size(budget)} is too small: the non-expert weights on the GPU need "
            f"{size(non_expert)}, the KV cache for batch {batch} x {seq_len} tokens "
            f"{size(kv)}, workspace {size(ws)}, CUDA context {size(context)} and "
            f"expert staging {size(staging)}: at least {size(fixed + min_slots * slot)}")
    n_slots = (budget - fixed) // slot
    return MemoryPlan(budget, context, non_expert, kv, ws, staging, slot, int(n_slots), int(n_scratch))


def check_host_ram(need: int, available: int, what: str = "the routed-expert store") -> None:
    if need > available:
        raise BudgetError(f"host RAM too small for {what}: it needs {size(need)}, {size(available)} is available")

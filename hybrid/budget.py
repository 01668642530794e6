"""GPU memory budget: what the non-expert weights, KV cache and workspace take, and how many expert slots fit."""
from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .layout import non_expert_numel

GiB = 2**30
MARGIN = 384 * 2**20          # allocator rounding and fragmentation, cuBLAS workspaces


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

    @property
    def cache_bytes(self) -> int:
        return self.n_slots * self.slot_bytes

    @property
    def allocator_limit(self) -> int:
        """Bytes torch's allocator may reserve: the budget less the context."""
        return self.budget - self.context

    def describe(self) -> str:
        f = lambda b: f"{b / GiB:.2f} GiB"  # noqa: E731
        return (f"budget {f(self.budget)} = context {f(self.context)} + weights {f(self.non_expert)} + "
                f"KV {f(self.kv_cache)} + workspace {f(self.workspace)} + staging {f(self.staging)} + "
                f"cache {self.n_slots} experts ({f(self.cache_bytes)})")


def workspace_bytes(cfg: ModelConfig, batch: int, seq_len: int, chunk_tokens: int, itemsize: int) -> int:
    """Peak activation memory of one forward, for a prefill chunk of `chunk_tokens` (split over the batch)."""
    q = max(1, min(seq_len, chunk_tokens // batch))           # queries per sequence in one chunk
    T = batch * q
    H, C = cfg.num_attention_heads, cfg.kv_lora_rank
    from .model import ATTN_SCORE_ELEMS
    attn = min(batch * H * q * seq_len, ATTN_SCORE_ELEMS) * (4 * 3 + itemsize) + 2 * batch * H * q * C * itemsize \
        + batch * q * seq_len * 4
    dense = T * cfg.intermediate_size * 3 * itemsize
    moe = T * cfg.num_experts_per_tok * (cfg.hidden_size * 3 + cfg.moe_intermediate_size * 3) * itemsize
    logits = batch * cfg.vocab_size * 4 * 3
    hidden = T * cfg.hidden_size * 8 * itemsize
    return attn + max(dense, moe) + logits + hidden


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
                graph_tokens: int = 0) -> MemoryPlan:
    """Split `budget` bytes; raise BudgetError naming what does not fit. graph_tokens: the largest prefill
    captured as a graph, 0 for none."""
    from .model import LatentCache
    non_expert = non_expert_numel(cfg) * itemsize
    kv = LatentCache.nbytes(cfg, batch, seq_len, itemsize)
    ws = workspace_bytes(cfg, batch, seq_len, chunk_tokens, itemsize) + margin \
        + prefill_graph_bytes(cfg, graph_tokens, itemsize)
    slot = cfg.expert_numel * itemsize
    staging = staging_slots * slot
    fixed = context + non_expert + kv + ws + staging
    if budget < fixed + min_slots * slot:
        raise BudgetError(
            f"GPU memory budget {budget / GiB:.2f} GiB is too small: the non-expert weights need "
            f"{non_expert / GiB:.2f} GiB, the KV cache for batch {batch} x {seq_len} tokens "
            f"{kv / GiB:.2f} GiB, workspace {ws / GiB:.2f} GiB, CUDA context {context / GiB:.2f} GiB and "
            f"expert staging {staging / GiB:.2f} GiB: at least {(fixed + min_slots * slot) / GiB:.2f} GiB")
    n_slots = (budget - fixed) // slot
    return MemoryPlan(budget, context, non_expert, kv, ws, staging, slot, int(n_slots))


def check_host_ram(need: int, available: int, what: str = "the routed-expert store") -> None:
    if need > available:
        raise BudgetError(f"host RAM too small for {what}: it needs {need / GiB:.1f} GiB, "
                          f"{available / GiB:.1f} GiB is available")

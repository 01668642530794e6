"""Builds the expert backend for a run's mode: this is where the offloading runtimes plug into the model."""
from __future__ import annotations

import os
import sys
from dataclasses import replace

import torch

from cost_model.costs import load_costs
from ..model.checkpoint import Checkpoint
from ..model.config import ConfigError, ModelConfig, RunConfig
from ..kernels.quant_scratch import CHUNK as SCRATCH_CHUNK
from ..model.quant import ExpertLayout, expert_bytes, layout
from ..model.layout import device_weight_numel
from .budget import MARGIN, UNLIMITED, BudgetError, MemoryPlan, auto_chunk_tokens, auto_graph_tokens, plan_memory, size
from .expert_store import ExpertStore
from .resident import ResidentExperts

AUTO_MARGIN = 512 * 2**20     # mode auto leaves this much of the free GPU memory to others


def staging_slots(cfg: ModelConfig) -> int:
    return 3 * cfg.num_experts_per_tok


def cuda_context_bytes(device: torch.device) -> int:
    """Device memory in use before torch allocates anything (context, libraries): outside the allocator."""
    torch.cuda.init()
    torch.empty(1, device=device)
    return outside_allocator_bytes(device)


def outside_allocator_bytes(device: torch.device) -> int:
    """Device memory in use outside torch's caching allocator: the context, and what grows after it (kernel modules
    loaded on first use, CUDA graph executables). The device's used memory less the allocator's: this process's
    where it has the GPU to itself (the benchmarks' case), an over-estimate where others share it."""
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def graph_tokens(run: RunConfig, device: torch.device) -> int:
    """The largest prefill (tokens) that graphs.PrefillRunner captures; 0 where it never captures."""
    capture = device.type == "cuda" and run.cuda_graphs and run.static_decode
    return run.prefill_graph_tokens if capture else 0


def run_budget(run: RunConfig, device: torch.device, context: int) -> int:
    """run.gpu_memory, else all free memory (unlimited on the CPU)."""
    if run.gpu_memory is not None:
        return run.gpu_memory
    return torch.cuda.mem_get_info(device)[0] + context if device.type == "cuda" else UNLIMITED


def with_workspace(cfg: ModelConfig, run: RunConfig, device: torch.device, itemsize: int,
                   context: int) -> RunConfig:
    """The run with a concrete prefill chunk and prefill-graph size: its own, else what its budget affords
    (budget.auto_chunk_tokens, auto_graph_tokens)."""
    if run.prefill_chunk_tokens is not None and run.prefill_graph_tokens is not None:
        return run
    budget = run_budget(run, device, context)
    if run.prefill_chunk_tokens is None:
        run = replace(run, prefill_chunk_tokens=auto_chunk_tokens(cfg, budget, run.max_batch_size, run.max_seq_len,
                                                                  itemsize))
    if run.prefill_graph_tokens is None:
        run = replace(run, prefill_graph_tokens=auto_graph_tokens(cfg, budget, itemsize))
    return run


def device_weight_bytes(cfg: ModelConfig, ckpt, itemsize: int) -> int:
    """The non-expert weights on the device of an offloading run: at itemsize, but a GGUF file's shared experts,
    dense MLPs, attention projections and output head where they stay in their blocks (GgufCheckpoint.ffn_layout,
    linear_layout; all resident they are dequantized too)."""
    total = device_weight_numel(cfg) * itemsize
    layout_of = getattr(ckpt, "ffn_layout", None)
    for layer in range(cfg.num_hidden_layers) if layout_of else ():
        lay = layout_of(layer, "shared" if cfg.is_moe_layer(layer) else "dense")
        if lay is not None:
            total -= 3 * lay.w2.rows * lay.w2.cols * itemsize - lay.nbytes
        for name in ("q_proj" if cfg.q_lora_rank is None else "q_a_proj", "kv_a_proj_with_mqa", "o_proj"):
            mat = ckpt.linear_layout(f"model.layers.{layer}.self_attn.{name}.weight")
            if mat is not None:
                total -= mat.rows * mat.cols * itemsize - mat.nbytes
    mat = ckpt.linear_layout("lm_head.weight") if layout_of else None
    return total - (mat.rows * mat.cols * itemsize - mat.nbytes if mat is not None else 0)


def memory_plan(cfg: ModelConfig, run: RunConfig, device: torch.device, itemsize: int, context: int,
                weights: int | None = None) -> MemoryPlan:
    """How the run's budget (run_budget) splits for this run (`weights`: device_weight_bytes, default all at
    itemsize)."""
    cuda = device.type == "cuda"
    budget = run_budget(run, device, context)
    run = with_workspace(cfg, run, device, itemsize, context)
    return plan_memory(cfg, budget, run.max_batch_size, run.max_seq_len, itemsize, run.prefill_chunk_tokens,
                       staging_slots(cfg) if run.mode != "gpu" else 0, context,
                       margin=MARGIN if cuda else 0, graph_tokens=graph_tokens(run, device),
                       slot_bytes=expert_bytes(cfg, run.experts, itemsize),
                       scratch_expert=scratch_expert_bytes(cfg, run, itemsize), scratch_experts=run.prefill_scratch,
                       scratch_max=SCRATCH_CHUNK, weights=weights)


def scratch_expert_bytes(cfg: ModelConfig, run: RunConfig, itemsize: int) -> int:
    """Offloading quantized experts: prefill dequantizes a few at a time into a scratch (kernels/quant_scratch.py)
    of this many bytes each; 0 where there is none."""
    return cfg.expert_numel * itemsize if run.experts != "bf16" and run.mode != "gpu" else 0


def limit_allocator(plan: MemoryPlan, device: torch.device) -> None:
    """Hold torch's allocator to the plan's share of the device (the budget less the CUDA context)."""
    total = torch.cuda.get_device_properties(device).total_memory
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(min(1.0, plan.allocator_limit / total), index)


def auto_budget(free: int, requested: int | None) -> int:
    """Mode auto's budget: the one asked for, else the free memory less AUTO_MARGIN."""
    if requested is not None:
        return requested
    if free <= AUTO_MARGIN:
        raise BudgetError(f"mode auto: only {size(free)} of GPU memory is free, less than the {size(AUTO_MARGIN)} it "
                          "leaves to others: free some, pass --gpu-memory, or use --device cpu")
    return free - AUTO_MARGIN


def machine_fingerprint(device: torch.device, threads: int | None, kernel: str, experts: str = "bf16") -> dict:
    from .calibration import fingerprint
    return fingerprint(device, threads, kernel, experts)


def experts_bytes(cfg: ModelConfig, run: RunConfig, itemsize: int, ckpt=None) -> int:
    """Every routed expert in the run's format (each layer of `ckpt` in its own layout: own_layouts)."""
    per, own = expert_bytes(cfg, run.experts, itemsize), own_layouts(cfg, ckpt, quant_layout(cfg, run))
    return cfg.n_routed_experts * sum(own[layer].nbytes if layer in own else per for layer in cfg.moe_layers)


def own_layouts(cfg: ModelConfig, ckpt, quant: ExpertLayout | None) -> dict[int, ExpertLayout]:
    """The layers whose experts a GGUF holds smaller than quant's layout (Q4_K_M's Q5_0 downs: q5, not widened to
    q8), in their own layouts."""
    own = getattr(ckpt, "layer_layout", None)
    if quant is None or own is None:
        return {}
    layouts = {layer: own(layer, quant) for layer in cfg.moe_layers}
    return {layer: lay for layer, lay in layouts.items() if lay != quant}


def quant_layout(cfg: ModelConfig, run: RunConfig) -> ExpertLayout | None:
    return None if run.experts == "bf16" else layout(cfg, run.experts)


def build_backend(cfg: ModelConfig, ckpt: Checkpoint, run: RunConfig, device: torch.device,
                  dtype: torch.dtype, progress: bool = True, context: int = 0):
    """The ExpertBackend for run.mode (a concrete mode: see mode_choice.py). `context` is the device memory the CUDA
    context holds (outside the allocator, inside the budget)."""
    itemsize = torch.empty(0, dtype=dtype).element_size()
    plan = memory_plan(cfg, run, device, itemsize, context,
                       device_weight_bytes(cfg, ckpt, itemsize) if run.weights_in_blocks else None)
    if device.type == "cuda" and run.gpu_memory is not None:
        limit_allocator(plan, device)
    if run.mode == "gpu":
        need = experts_bytes(cfg, run, itemsize, ckpt)
        if run.gpu_memory is not None and need > plan.cache_bytes:
            raise BudgetError(f"mode gpu keeps every expert resident ({size(need)}) but the budget "
                              f"leaves {size(plan.cache_bytes)} for them: use --mode auto|fetch|cpu|hybrid")
        quant = quant_layout(cfg, run)
        host = None if quant is None else ExpertStore(cfg, ckpt, dtype, pin=False, progress=progress, quant=quant,
                                                      layouts=own_layouts(cfg, ckpt, quant))
        return ResidentExperts(cfg, ckpt, device, dtype, progress, quant, host)
    return build_offloaded(cfg, ckpt, run, device, dtype, plan, progress)


def build_offloaded(cfg, ckpt, run, device, dtype, plan: MemoryPlan, progress: bool):
    from ..planning.copy_ahead import CopyAhead
    from .executor import OffloadedExperts
    from .expert_cache import ExpertCache
    from .lanes import CpuLane
    from ..planning.prefetch import Prefetcher
    from ..planning.scheduler import PLANNERS
    cuda = device.type == "cuda"
    quant = quant_layout(cfg, run)
    n_slots = plan.n_slots if run.cache_slots is None else min(plan.n_slots, run.cache_slots)
    own = own_layouts(cfg, ckpt, quant)
    whole, n_slots = own_size_layers(cfg, own, quant, cache_layout(run), n_slots, plan.slot_bytes)
    store = ExpertStore(cfg, ckpt, dtype, pin=cuda, progress=progress, quant=quant, layouts=own)
    cache = ExpertCache(cfg, n_slots, staging_slots(cfg), dtype, device, run.cache_policy, quant, cache_layout(run),
                        whole)
    for layer in cfg.moe_layers:
        for e in range(cfg.n_routed_experts):
            slot = cache.place(layer, e)
            if slot is None:
                break
            buf = store.buffer(layer, e)
            cache.view(slot)[:buf.numel()].copy_(buf)
            if layer not in whole:
                cache.table.set(layer, e, slot)
    lane = CpuLane(run.cpu_threads, cuda, run.cpu_kernel, run.cpu_pool, run.cpu_tiles, run.cpu_pool_spin_us,
                   run.cpu_prefetch, quant, run.cpu_dot)
    if lane.experts.why and progress:
        print(f"CPU experts: torch path ({lane.experts.why})", file=sys.stderr)
    if run.costs_path is not None and not os.path.exists(run.costs_path):
        raise ConfigError(f"calibration file {run.costs_path} does not exist (run `python calibrate.py --out ...`)")
    costs, why = load_costs(run.costs_path or default_costs_path(run.experts),
                            machine_fingerprint(device, run.cpu_threads, lane.experts.label, run.experts))
    if run.mode == "hybrid" and progress:
        print(f"cost model: {why}", file=sys.stderr)
    planner = PLANNERS[run.mode](costs)
    prefetch = Prefetcher(cfg, lookahead=run.lookahead) if prefetch_kind(run) in ("gate", "mlp") else None
    if progress:
        print(f"memory: {plan.describe(len(cfg.moe_layers) * cfg.n_routed_experts)}", file=sys.stderr)
    ahead = CopyAhead(costs.fetch_ms, staging_slots(cfg) // 3) if run.copy_ahead and run.mode != "cpu" else None
    backend = OffloadedExperts(cfg, store, cache, planner, device, lane, prefetch, decode_tokens=run.max_batch_size,
                               copy_ahead=ahead, scratch_experts=plan.scratch_experts, graphs=run.cuda_graphs)
    if progress:
        own = f", {len(whole)} at their own size, {cache.n_slots} common slots" if whole else ""
        print(f"cache layout {cache.layout}: {len(backend.pinned.layers)} of {len(cfg.moe_layers)} MoE layers whole "
              f"(run without the host{own}); prefetch {prefetch_kind(run)}", file=sys.stderr)
    return backend


def own_size_layers(cfg: ModelConfig, own: dict[int, ExpertLayout], quant: ExpertLayout | None, layout: str,
                    n_slots: int, slot_bytes: int) -> tuple[dict[int, ExpertLayout], int]:
    """Under whole layers, where some layers' experts are smaller in their own layouts (`own`: own_layouts, e.g.
    Q4_K_M's Q5_0 downs as q5) than in quant's: the layers held whole at their own size, smallest first, in the
    bytes of n_slots slots ({layer: its layout}), and the slots of quant's size left. Else ({}, n_slots)."""
    from .expert_cache import whole_layers
    if not own or layout != "layers":
        return {}, n_slots
    layouts = {layer: own.get(layer, quant) for layer in cfg.moe_layers}
    whole, left = whole_layers({layer: lay.nbytes for layer, lay in layouts.items()}, cfg.n_routed_experts,
                               n_slots * slot_bytes, slot_bytes)
    return {layer: layouts[layer] for layer in whole}, left


def cache_layout(run: RunConfig) -> str:
    """The cache layout run.cache_layout names; `auto`: whole layers at batch 1 (measured faster there: fewer
    routing syncs, and the CPU lane gets a layer's six experts at once), equal shares at larger batches (measured
    faster at batch 16, where every layer misses anyway and a layer with no share has only the staging ring)."""
    if run.cache_layout != "auto":
        return run.cache_layout
    return "layers" if run.max_batch_size == 1 else "spread"


def prefetch_kind(run: RunConfig) -> str:
    """The prefetch run.prefetch names; `auto`: gate in mode hybrid at batch 1 (measured faster there on the Q4_K_M
    file at 4, 6 and 8 GiB, eval/results/blocks_h200/), none otherwise (measured slower at batch 16, where the
    copies it makes displace the layer's own)."""
    if run.prefetch != "auto":
        return run.prefetch
    return "gate" if run.mode == "hybrid" and run.max_batch_size == 1 else "none"


def default_costs_path(experts: str = "bf16") -> str:
    from .calibration import default_path
    return str(default_path(experts))

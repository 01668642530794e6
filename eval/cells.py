"""One sweep job in its own process: a mode (or peer) at one batch size over several prompt lengths."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from common import hf_peer, load_prompts, write_atomic
from hybrid.model.config import RunConfig
from hybrid.engine.engine import Engine
from hybrid.engine.sampling import SamplingParams
from hybrid.engine.tokenizer import load_tokenizer

WARM_PREFILLS = 2


def refs_dir(a) -> Path:
    """Reference logits of this sweep's checkpoint: under the out-dir, one folder per checkpoint identity and
    expert format."""
    from hybrid.model.gguf_checkpoint import open_checkpoint
    path = Path(a.out_dir) / "refs" / open_checkpoint(a.model).identity() / a.experts
    path.mkdir(parents=True, exist_ok=True)
    return path


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


OFFLOAD_BUDGET = 12 * 2**30          # the offload modes' budget where --gpu-memory is not given


def cell_budget(a, mode: str) -> int | None:
    """A cell's GPU budget: --gpu-memory or 12 GiB for the offload modes, mode auto (which picks gpu or hybrid
    within it, as run.py's default does) and accelerate; none for mode gpu (all resident) and transformers."""
    if mode == "transformers" or mode.partition("+")[0] == "gpu":
        return None
    return a.gpu_memory if a.gpu_memory is not None else OFFLOAD_BUDGET


def make_engine(a, mode: str, batch: int, seq: int) -> Engine:
    cuda = torch.cuda.is_available()
    budget = cell_budget(a, mode) if cuda else None
    mode, _, prefetch = mode.partition("+")
    run = RunConfig(device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32", mode=mode,
                    experts=a.experts, prefetch=prefetch or "none", gpu_memory=budget,
                    cache_policy=a.cache_policy, cache_layout=a.cache_layout, max_batch_size=batch, max_seq_len=seq,
                    prefill_graph_tokens=None if a.prefill_graphs == "on" else 0)
    return Engine(a.model, run, progress=False)


def allocator_syncs() -> dict:
    """Caching-allocator events that synchronise the whole device (copy stream included): retries after
    freeing cached blocks at the memory cap, and explicit all-stream syncs."""
    if not torch.cuda.is_available():
        return {}
    m = torch.cuda.memory_stats()
    return {"alloc_retries": m.get("num_alloc_retries", 0), "sync_all_streams": m.get("num_sync_all_streams", 0),
            "device_frees": m.get("num_device_free", 0)}


def warm_prefill(e: Engine, prompts: list[list[int]]) -> float:
    """One prefill of the cell's prompts (and one token) before it is measured -> its TTFT in ms. A cell is
    measured after two: the first pays for new shapes (allocations, cuBLAS plans, pinned buffers), the second
    captures the prefill graphs where the engine keeps them (hybrid.engine.graphs.PrefillRunner)."""
    return 1000 * e.generate(prompts, SamplingParams(max_new_tokens=1, stop_on_eos=False)).stats.ttft_s


def cell(e: Engine, mode: str, prompts: list[list[int]], new: int) -> dict:
    before = allocator_syncs()
    out = e.generate(prompts, SamplingParams(max_new_tokens=new, stop_on_eos=False))
    s = out.stats
    row = {**s.summary(), "mode": mode, "ran_as": e.run.mode, "weights_in_blocks": e.run.weights_in_blocks,
           **{k: v - before[k] for k, v in allocator_syncs().items()}}
    lane = getattr(e.backend, "cpu", None)
    if lane is not None:
        row["cpu_kernel"] = lane.experts.label
    row["_tokens"] = out.tokens
    return row


def check(e: Engine, a, mode: str, row: dict, prompt: list[int]) -> None:
    """Against gpu mode on the same cell: greedy tokens and logits (and the fp32 engine when asked)."""
    refs = refs_dir(a)
    tag = refs / f"{row['batch_size']}_{row['prompt_tokens']}.pt"
    logits = e.logits(prompt[:64]).float().cpu()
    if mode == "gpu":
        torch.save({"tokens": row["_tokens"], "logits": logits}, tag)
        return
    if not tag.exists():
        return
    ref = torch.load(tag, weights_only=True)
    first = [next((i for i, (x, y) in enumerate(zip(p, q)) if x != y), len(p)) for p, q in zip(row["_tokens"], ref["tokens"])]
    row["tokens_identical_prefix"] = min(first)
    row["logits_rel_err_vs_gpu"] = rel(logits, ref["logits"])
    if (refs / "fp32.pt").exists():
        row["logits_rel_err_vs_fp32"] = rel(logits, torch.load(refs / "fp32.pt", weights_only=True))


def fp32_reference(a, prompt: list[int]) -> None:
    e = Engine(a.model, RunConfig(device="cuda", dtype="float32", max_seq_len=72), progress=False)
    torch.save(e.logits(prompt[:64]).float().cpu(), refs_dir(a) / "fp32.pt")


def run_job(a) -> None:
    mode, batch = a.one.rsplit(":", 1)
    batch = int(batch)
    lens = [int(x) for x in a.prompt_lens.split(",")]
    tok = load_tokenizer(a.model, a.tokenizer)
    rows: list[dict] = []
    if mode.startswith("transformers"):
        mm = None if mode == "transformers" else {0: cell_budget(a, mode), "cpu": 200 * 2**30}
        prompts = load_prompts(a.prompts, tok, min(lens), batch)
        rows.append(hf_peer(a.model, prompts, a.peer_new_tokens if mm is None else a.accelerate_new_tokens, mm))
        write_atomic(Path(a.rows), json.dumps(rows))
        return
    e = make_engine(a, mode, batch, max(lens) + a.new_tokens + 8)
    e.generate(load_prompts(a.prompts, tok, 16, batch), SamplingParams(max_new_tokens=4))      # warm-up, graphs
    for n in lens:
        prompts = load_prompts(a.prompts, tok, n, batch)
        first = [warm_prefill(e, prompts) for _ in range(WARM_PREFILLS)]
        row = cell(e, mode, prompts, a.new_tokens)
        row["ttft_first_ms"], row["ttft_second_ms"] = first
        if n == min(lens):
            check(e, a, mode, row, prompts[0])
        row.pop("_tokens")
        rows.append(row)
        write_atomic(Path(a.rows), json.dumps(rows))
    if mode == "gpu" and a.fp32_reference and batch == 1:
        del e
        torch.cuda.empty_cache()
        fp32_reference(a, load_prompts(a.prompts, tok, min(lens), 1)[0])

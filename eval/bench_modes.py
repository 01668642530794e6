"""Time every mode (and the transformers peers) on one checkpoint at one batch size and prompt length.

    python eval/bench_modes.py --model /dev/shm/v2lite --gpu-memory 12GiB --modes gpu,fetch,cpu,hybrid,hybrid+gate
Writes JSON under eval/results/ with the device, versions, date and command; prints a table last."""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from common import DEFAULT_PROMPTS, ROOT, hf_peer, load_prompts, meta
from hybrid.cli import parse_bytes
from hybrid.config import RunConfig
from hybrid.engine import Engine
from hybrid.sampling import SamplingParams
from hybrid.tokenizer import load_tokenizer


def run_mode(model: str, spec: str, a, prompts, store=None) -> tuple[dict, Engine]:
    mode, _, prefetch = spec.partition("+")
    cuda = torch.cuda.is_available()
    run = RunConfig(device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32", mode=mode, prefetch=prefetch or "none",
                    gpu_memory=None if mode == "gpu" or not cuda else a.gpu_memory, cache_policy=a.cache_policy,
                    max_batch_size=len(prompts), max_seq_len=len(prompts[0]) + a.new_tokens + 8)
    t = time.perf_counter()
    e = Engine(model, run, progress=False, store=store)
    load_s = time.perf_counter() - t
    e.generate(prompts, SamplingParams(max_new_tokens=4, stop_on_eos=False))          # warm-up
    out = e.generate(prompts, SamplingParams(max_new_tokens=a.new_tokens, stop_on_eos=False))
    row = {**out.stats.summary(), "mode": spec, "load_s": load_s, "tokens": out.tokens}
    if hasattr(e.backend, "memory"):
        row["n_slots"] = e.backend.memory.n_slots
    row["logits"] = e.logits(prompts[0][:64]).float().cpu()
    return row, e


def agreement(row: dict, ref: dict) -> dict:
    rel = ((row["logits"] - ref["logits"]).norm() / ref["logits"].norm()).item()
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
             for a, b in zip(row["tokens"], ref["tokens"])]
    return {"logits_rel_err_vs_gpu": rel, "tokens_identical_prefix": min(first)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer")
    ap.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    ap.add_argument("--gpu-memory", type=parse_bytes, default=parse_bytes("12GiB"))
    ap.add_argument("--modes", default="gpu,fetch,cpu,hybrid,hybrid+gate")
    ap.add_argument("--cache-policy", default="lfu")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--peers", default="hf,accelerate", help="hf (all on GPU), accelerate (same budget)")
    ap.add_argument("--peer-new-tokens", type=int, default=32)
    ap.add_argument("--accelerate-new-tokens", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "bench_modes.json"))
    a = ap.parse_args()
    tok = load_tokenizer(a.model, a.tokenizer)
    prompts = load_prompts(a.prompts, tok, a.prompt_len, a.batch_size)
    rows, peers = [], [p for p in a.peers.split(",") if p]
    if "hf" in peers:
        rows.append(hf_peer(a.model, prompts, a.peer_new_tokens))
    ref, store = None, None
    for spec in a.modes.split(","):
        row, engine = run_mode(a.model, spec, a, prompts, store)
        store = getattr(engine.backend, "store", store)
        if spec == "gpu":
            ref = row
        elif ref is not None:
            row.update(agreement(row, ref))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k not in ("tokens", "logits")}), flush=True)
        del engine
        gc.collect()
        torch.cuda.empty_cache()
    if "accelerate" in peers:
        torch.cuda.set_per_process_memory_fraction(1.0)
        del store
        gc.collect()
        rows.append(hf_peer(a.model, prompts, a.accelerate_new_tokens,
                            {0: a.gpu_memory, "cpu": 200 * 2**30}))
    for r in rows:
        r.pop("logits", None)
        r.pop("tokens", None)
    json.dump({"meta": meta(), "gpu_memory": a.gpu_memory, "rows": rows}, open(a.out, "w"), indent=2)
    print(f"\n{'mode':<24}{'TTFT ms':>9}{'ms/tok':>9}{'tok/s':>8}{'hit%':>7}{'cpu%':>6}{'GiB':>7}{'rel err':>9}")
    for r in rows:
        print(f"{r['mode']:<24}{r['ttft_ms']:9.1f}{r['tpot_ms_mean']:9.2f}{r['decode_tok_s']:8.1f}"
              f"{100 * r.get('hit_rate', 1):7.1f}{100 * r.get('cpu_share', 0):6.1f}{r['peak_gpu_gib']:7.2f}"
              f"{r.get('logits_rel_err_vs_gpu', 0):9.2e}")


if __name__ == "__main__":
    main()

"""Time every mode (and the transformers peers) on one checkpoint at one batch size and prompt length.

    python eval/bench_modes.py --model /dev/shm/v2lite --gpu-memory 12GiB --modes gpu,fetch,cpu,hybrid,hybrid+gate
Writes JSON under eval/results/ with the device, versions, date and command; prints a table last."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def agreement(row: dict, ref: dict) -> dict:
    first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
             for a, b in zip(row["tokens"], ref["tokens"])]
    out = {"logits_rel_err_vs_gpu": rel(row["logits"], ref["logits"]), "tokens_identical_prefix": min(first)}
    if "fp32" in ref:
        out["logits_rel_err_vs_fp32"] = rel(row["logits"], ref["fp32"])
    return out


def fp32_logits(model: str, prompt: list[int]) -> torch.Tensor:
    """The same prompt through the engine in float32 (everything resident): the precision reference."""
    e = Engine(model, RunConfig(device="cuda", dtype="float32", max_seq_len=len(prompt) + 8), progress=False)
    return e.logits(prompt).float().cpu()


def one(a) -> None:
    """Child process: one mode or peer, its row written as JSON (reference tokens/logits kept as .pt)."""
    tok = load_tokenizer(a.model, a.tokenizer)
    prompts = load_prompts(a.prompts, tok, a.prompt_len, a.batch_size)
    if a.one in ("transformers", "transformers+accelerate"):
        mm = None if a.one == "transformers" else {0: a.gpu_memory, "cpu": 200 * 2**30}
        n = a.peer_new_tokens if mm is None else a.accelerate_new_tokens
        row = hf_peer(a.model, prompts, n, mm)
    else:
        row, _ = run_mode(a.model, a.one, a, prompts)
        ref_path = Path(a.row).with_name("gpu_reference.pt")
        if a.one == "gpu":
            ref = {"tokens": row["tokens"], "logits": row["logits"]}
            if a.fp32_reference:
                del _
                torch.cuda.empty_cache()
                ref["fp32"] = fp32_logits(a.model, prompts[0][:64])
                row["logits_rel_err_vs_fp32"] = rel(row["logits"], ref["fp32"])
            torch.save(ref, ref_path)
        elif ref_path.exists():
            row.update(agreement(row, torch.load(ref_path)))
        row.pop("tokens"), row.pop("logits")
    Path(a.row).write_text(json.dumps(row))


def table(rows: list[dict]) -> None:
    print(f"\n{'mode':<24}{'TTFT ms':>9}{'ms/tok':>9}{'tok/s':>8}{'hit%':>7}{'cpu%':>6}{'GiB':>7}{'vs gpu':>9}{'same':>6}{'vs fp32':>10}")
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:<24} failed: {r['error'][-80:]}")
            continue
        print(f"{r['mode']:<24}{r['ttft_ms']:9.1f}{r['tpot_ms_mean']:9.2f}{r['decode_tok_s']:8.1f}"
              f"{100 * r.get('hit_rate', 1):7.1f}{100 * r.get('cpu_share', 0):6.1f}{r['peak_gpu_gib']:7.2f}"
              f"{r.get('logits_rel_err_vs_gpu', 0):9.2e}{r.get('tokens_identical_prefix', -1):6d}"
              f"{r.get('logits_rel_err_vs_fp32', 0):10.2e}")


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
    ap.add_argument("--peers", default="transformers,transformers+accelerate")
    ap.add_argument("--peer-new-tokens", type=int, default=32)
    ap.add_argument("--accelerate-new-tokens", type=int, default=6)
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "bench_modes.json"))
    ap.add_argument("--fp32-reference", action="store_true", help="also run gpu mode in float32 (needs ~64 GB)")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--row", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one(a)
    specs = [m for m in a.modes.split(",") if m] + [p for p in a.peers.split(",") if p]
    rows, work = [], Path(tempfile.mkdtemp())
    for spec in specs:
        row_path = work / f"{spec.replace('+', '_')}.json"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", spec, "--row", str(row_path)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        row = json.loads(row_path.read_text()) if r.returncode == 0 else {"mode": spec, "error": r.stderr[-2000:]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    json.dump({"meta": meta(), "gpu_memory": a.gpu_memory, "rows": rows}, open(a.out, "w"), indent=2)
    table(rows)


if __name__ == "__main__":
    main()

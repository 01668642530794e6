"""Shared command-line options for the entry scripts (argparse lives only in scripts and here)."""
from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import torch

from .config import RunConfig
from .tokenizer import find_tokenizer_dir

CACHE = Path(os.environ.get("HYBRID_CACHE", Path.home() / ".cache" / "hybrid-moe"))
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30}


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a size (e.g. 12GiB, 500MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def default_model(preset: str = "small") -> Path:
    """The embedded default: a small synthetic checkpoint, written once into the cache directory."""
    from .synthetic import PRESETS, write_checkpoint
    path = CACHE / f"synthetic-{preset}"
    if not (path / "model.safetensors.index.json").exists():
        config, shards = PRESETS[preset]
        write_checkpoint(path, config, shards, seed=0, device="cpu", tokenizer=find_tokenizer_dir())
    return path


def engine_args(ap: argparse.ArgumentParser) -> None:
    gpu = torch.cuda.is_available()
    ap.add_argument("--model", help="checkpoint directory (Hugging Face layout); default: small synthetic")
    ap.add_argument("--mode", default="gpu", choices=["gpu", "fetch", "cpu", "hybrid"])
    ap.add_argument("--device", default="cuda" if gpu else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default on GPU) | float32 (default on CPU)")
    ap.add_argument("--gpu-memory", type=parse_bytes, help="whole GPU budget, e.g. 12GiB")
    ap.add_argument("--cache-policy", default="lfu", choices=["lfu", "lru", "static"])
    ap.add_argument("--prefetch", default="none", choices=["none", "gate", "mlp"],
                    help="predict the next layer's experts with its router (gate) or a trained predictor (mlp)")
    ap.add_argument("--no-lookahead", dest="lookahead", action="store_false",
                    help="with prefetch: plan each layer alone (on-demand copies not charged for displaced prefetches)")
    ap.add_argument("--predictors", help="trained predictor file for --prefetch mlp (default: by checkpoint)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--max-seq-len", type=int, default=4096)
    ap.add_argument("--cpu-threads", type=int)
    ap.add_argument("--cpu-kernel", default=os.environ.get("HYBRID_CPU_KERNEL", "auto"),
                    choices=["auto", "native", "torch"],
                    help="CPU experts: native kernel (built on first use) | torch | auto (native if it builds)")
    ap.add_argument("--cpu-pool", default=os.environ.get("HYBRID_CPU_POOL", "on"), choices=["on", "off"],
                    help="native CPU kernel on its own thread pool, started before the layer's GPU work is queued "
                         "(off: on torch's OpenMP team after it)")
    ap.add_argument("--cpu-tiles", default=os.environ.get("HYBRID_CPU_TILES", "auto"), choices=["auto", "off"],
                    help="native CPU kernel's AMX tile path for experts of more than 8 tokens (prefill), where the "
                         "CPU has AMX (off: torch's path for them)")
    ap.add_argument("--copy-ahead", default=os.environ.get("HYBRID_COPY_AHEAD", "on"), choices=["on", "off"],
                    help="prefill: queue copies of the next layer's uncached experts behind this layer's, into the "
                         "PCIe lane's idle time before the next routing (modes fetch, hybrid)")
    ap.add_argument("--prefill-graph-tokens", type=int,
                    default=int(os.environ.get("HYBRID_PREFILL_GRAPH_TOKENS", "512")),
                    help="prompts of at most this many tokens (batch x length) whose shape was seen before prefill "
                         "from CUDA graphs (the launches between MoE layers replayed); 0: never")
    ap.add_argument("--costs", help="calibration JSON (default: this machine's, from calibrate.py)")


def run_config(a: argparse.Namespace) -> RunConfig:
    dtype = a.dtype or ("bfloat16" if str(a.device).startswith("cuda") else "float32")
    return RunConfig(device=a.device, dtype=dtype, mode=a.mode, gpu_memory=a.gpu_memory,
                     cache_policy=a.cache_policy, prefetch=a.prefetch, max_batch_size=a.batch_size,
                     max_seq_len=a.max_seq_len, cpu_threads=a.cpu_threads, cpu_kernel=a.cpu_kernel,
                     cpu_pool=a.cpu_pool == "on", cpu_tiles=a.cpu_tiles, copy_ahead=a.copy_ahead == "on", costs_path=a.costs,
                     predictor_path=a.predictors, lookahead=a.lookahead,
                     prefill_graph_tokens=a.prefill_graph_tokens)


def make_engine(a: argparse.Namespace):
    from .engine import Engine
    return Engine(a.model, run_config(a))

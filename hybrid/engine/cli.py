"""Shared command-line options for the entry scripts (argparse lives only in scripts and here)."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

from ..model.config import CHOICES, ConfigError, RunConfig, cache_dir
from .tokenizer import find_tokenizer_dir

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written, and every option's default in its help (where the help does not
    already say it)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or any(action.default is v for v in (None, False, True, argparse.SUPPRESS)):
            return text
        return f"{text} (default: %(default)s)"


class ArgParser(argparse.ArgumentParser):
    """argparse with the project's error convention: one `error:` line on stderr and exit code 2."""

    def __init__(self, **kw):
        super().__init__(formatter_class=HelpFormatter, **kw)

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"cannot read {text!r} as a positive size (e.g. 12GiB, 500MiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def at_least(low: int):
    """An argparse type: an integer >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def check_paths(a: argparse.Namespace, inputs=(), outputs=()) -> None:
    """Before anything is loaded: each named input file or folder exists, each output's folder exists."""
    for name in inputs:
        value = getattr(a, name, None)
        if value and not Path(value).exists():
            raise ConfigError(f"--{name.replace('_', '-')} {value}: no such file or directory")
    for name in outputs:
        value = getattr(a, name, None)
        if value and not Path(value).resolve().parent.is_dir():
            raise ConfigError(f"--{name.replace('_', '-')} {value}: the folder {Path(value).parent} does not exist")


def default_model(preset: str = "small") -> tuple[Path, bool]:
    """The embedded default: a small synthetic checkpoint, written once into the cache directory.
    -> (its folder, whether it was written now)."""
    from ..model.synthetic import PRESETS, write_checkpoint
    path = cache_dir() / f"synthetic-{preset}"
    if (path / "model.safetensors.index.json").exists():
        return path, False
    config, shards = PRESETS[preset]
    write_checkpoint(path, config, shards, seed=0, device="cpu", tokenizer=find_tokenizer_dir())
    return path, True


def model_and_tokenizer(a: argparse.Namespace, bytes_if_missing: bool = False):
    """Sets a.model to the embedded default where none was given (saying so) -> the model's tokenizer: a.tokenizer,
    else the model's own. UTF-8 bytes, with a warning, where none is found for the default model, or for any model
    with bytes_if_missing and no --tokenizer."""
    from .tokenizer import TokenizerError, load_tokenizer
    default = a.model is None
    if default:
        path, fresh = default_model()
        a.model = str(path)
        print(f"note: no --model given: {'wrote' if fresh else 'using'} a small synthetic checkpoint with random "
              f"weights at {path}; its output is gibberish by design", file=sys.stderr)
    try:
        return load_tokenizer(a.model, a.tokenizer)
    except TokenizerError:
        if not (default or bytes_if_missing and not a.tokenizer):
            raise
        print(f"warning: no tokenizer for {Path(a.model).name} (nor in ../shared/tokenizer or $HYBRID_TOKENIZER): "
              "it reads and writes UTF-8 bytes", file=sys.stderr)
        return load_tokenizer(a.model, "bytes")


def cpu_lane_args(ap: argparse.ArgumentParser) -> None:
    """The CPU lane's options (engine_args)."""
    ap.add_argument("--cpu-threads", type=at_least(1),
                    help="CPU threads (default: all cores but one with a GPU, all cores without; fewer while other "
                         "processes keep cores busy)")
    ap.add_argument("--cpu-kernel", default="auto", choices=CHOICES["cpu_kernel"],
                    help="CPU experts: native kernel (built on first use) | torch | auto (native if it builds)")
    ap.add_argument("--cpu-pool", default="on", choices=["on", "off"],
                    help="native CPU kernel on its own thread pool, started before the layer's GPU work is queued "
                         "(off: on torch's OpenMP team after it)")
    ap.add_argument("--cpu-tiles", default="auto", choices=["auto", "off"],
                    help="native CPU kernel's AMX tile path for experts of more than 8 tokens (prefill), where the "
                         "CPU has AMX (off: torch's path for them)")
    ap.add_argument("--cpu-dot", default="auto", choices=["auto", "off"],
                    help="native CPU kernel's bf16 dot-product path for bf16 and 4-bit experts at decode sizes, "
                         "where the CPU has AVX512-BF16 (off: its plain path)")
    ap.add_argument("--cpu-pool-spin-us", type=at_least(0), default=2000,
                    help="with a GPU: how long idle pool members spin before they sleep (the next layer's job "
                         "usually comes within it)")
    ap.add_argument("--cpu-prefetch", default="on", choices=["on", "off"], help="native CPU kernel's software prefetch")


def engine_args(ap: argparse.ArgumentParser, batch_flag: str = "--batch-size", batch_default: int = 1,
                batch_help: str = "sequences generated together") -> None:
    gpu = torch.cuda.is_available()
    ap.add_argument("--model", help="checkpoint directory (Hugging Face layout) or a llama.cpp .gguf file; default: a "
                                    "small synthetic checkpoint")
    ap.add_argument("--mode", default="auto", choices=CHOICES["mode"],
                    help="where routed experts run: gpu (all resident), fetch (copied over PCIe), cpu, hybrid "
                         "(per expert, by the cost model), auto (gpu if the model fits, else hybrid)")
    ap.add_argument("--experts", default="auto", choices=CHOICES["experts"],
                    help="routed experts' format: bf16 (as in the checkpoint, in the compute dtype), q8, q5, q4 or "
                         "q4k (8/5/4-bit groups of 32, as Q8_0 / Q5_0 / Q4_1; q4k: Q4_K gate/up, 8-bit down; quantized "
                         "once and kept in the cache folder, or moved from a GGUF's blocks); auto: a GGUF's own format, "
                         "else bf16")
    ap.add_argument("--device", default="cuda" if gpu else "cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--dtype", default=None, choices=CHOICES["dtype"],
                    help="compute dtype (default: bfloat16 on a GPU, float32 on the CPU)")
    ap.add_argument("--gpu-memory", type=parse_bytes,
                    help="the whole GPU budget (weights, KV cache, workspace, context, expert cache), e.g. 12GiB; "
                         "default: mode auto takes the free memory less 512 MiB, other modes all free memory")
    ap.add_argument("--cache-policy", default="lfu", choices=CHOICES["cache_policy"],
                    help="GPU expert cache: LFU with decay, LRU, or static (the first experts loaded stay)")
    ap.add_argument("--cache-layout", default="auto", choices=CHOICES["cache_layout"], help="expert cache: whole "
                    "layers (run without the host), equal shares (spread), or auto: layers at batch 1, else spread")
    ap.add_argument("--prefetch", default="auto", choices=CHOICES["prefetch"],
                    help="next layer's experts by its router (gate), a trained predictor (mlp); auto: gate in hybrid at batch 1")
    ap.add_argument("--no-lookahead", dest="lookahead", action="store_false",
                    help="with prefetch: plan each layer alone (on-demand copies not charged for displaced prefetches)")
    ap.add_argument("--predictors", help="trained predictor file for --prefetch mlp (default: by checkpoint)")
    ap.add_argument(batch_flag, dest="batch_size", metavar="N", type=at_least(1), default=batch_default,
                    help=batch_help)
    ap.add_argument("--max-seq-len", type=at_least(1), default=4096, help="KV cache tokens per sequence")
    cpu_lane_args(ap)
    ap.add_argument("--copy-ahead", default="on", choices=["on", "off"],
                    help="prefill: queue copies of the next layer's uncached experts behind this layer's, into the "
                         "PCIe lane's idle time before the next routing (modes fetch, hybrid)")
    ap.add_argument("--prefill-graph-tokens", type=at_least(0),
                    help="prompts of at most this many tokens (batch x length) whose shape was seen before prefill "
                         "from CUDA graphs (the launches between MoE layers replayed); 0: never; default: the "
                         "largest of 512/256/128 whose graphs take at most 1/24 of --gpu-memory")
    ap.add_argument("--prefill-chunk-tokens", type=at_least(1),
                    help="tokens per prefill forward (longer prompts run in chunks); default: the largest of "
                         "4096/2048/1024/512 whose activations take at most 1/16 of --gpu-memory")
    ap.add_argument("--prefill-scratch", type=at_least(0),
                    help="with --experts q8|q4 offloaded: experts prefill dequantizes at once into a bf16 scratch "
                         "(0: none, prefill on the fused kernels); default: up to 8, taking at most a quarter of "
                         "the expert cache's room")
    ap.add_argument("--costs", help="calibration JSON (default: this machine's, from calibrate.py)")


def run_config(a: argparse.Namespace) -> RunConfig:
    dtype = a.dtype or ("bfloat16" if str(a.device).startswith("cuda") else "float32")
    return RunConfig(device=a.device, dtype=dtype, mode=a.mode, experts=a.experts, gpu_memory=a.gpu_memory,
                     cache_policy=a.cache_policy, cache_layout=a.cache_layout, prefetch=a.prefetch,
                     max_batch_size=a.batch_size, max_seq_len=a.max_seq_len, cpu_threads=a.cpu_threads,
                     cpu_kernel=a.cpu_kernel, cpu_pool=a.cpu_pool == "on", cpu_tiles=a.cpu_tiles, cpu_dot=a.cpu_dot,
                     copy_ahead=a.copy_ahead == "on",
                     cpu_pool_spin_us=a.cpu_pool_spin_us, cpu_prefetch=a.cpu_prefetch == "on", costs_path=a.costs,
                     predictor_path=a.predictors, lookahead=a.lookahead,
                     prefill_graph_tokens=a.prefill_graph_tokens, prefill_scratch=a.prefill_scratch,
                     prefill_chunk_tokens=a.prefill_chunk_tokens)


def make_engine(a: argparse.Namespace):
    from .engine import Engine
    return Engine(a.model, run_config(a))

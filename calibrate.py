"""Measure this machine's offloading costs once (PCIe copy, GPU and CPU expert time, transfers) for --mode hybrid.

    python calibrate.py                 # writes ~/.cache/hybrid-moe/costs.json for this machine
    python calibrate.py --experts q4    # the same for 4-bit experts: costs-q4.json
"""
from __future__ import annotations

import json
import tempfile

import torch

from hybrid.offload.calibration import default_path, measure
from hybrid.engine.cli import ArgParser, at_least, check_paths
from hybrid.model.config import EXPERT_FORMATS, ConfigError, RunConfig
from hybrid.engine.engine import Engine
from hybrid.engine.sampling import SamplingParams
from hybrid.model.synthetic import PRESETS, write_checkpoint


def engine_overheads(device: torch.device, dtype: str, kernel: str, pool: bool, tiles: str = "auto",
                     prefetch: bool = True, experts: str = "bf16", dot: str = "auto") -> tuple[float, float]:
    """Per-MoE-layer fixed costs measured in the real runtime on a tiny model, whose expert math is negligible:
    (overhead of a layer whose experts are all cached, extra cost of handing a layer's experts to the CPU lane)."""
    config, shards = PRESETS["tiny"]
    config = {**config, "hidden_size": 256} if experts == "q4k" else config     # q4k: rows of whole 256-blocks
    medians = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(tmp, config, shards, progress=False)
        for mode, slots in (("fetch", None), ("cpu", 0)):
            run = RunConfig(device=str(device), dtype=dtype, mode=mode, experts=experts, max_seq_len=64,
                            cache_slots=slots, cache_layout="spread",      # planned layers, none pinned
                            cpu_kernel=kernel, cpu_pool=pool, cpu_tiles=tiles, cpu_prefetch=prefetch, cpu_dot=dot)
            e = Engine(str(path), run, progress=False)
            e.backend.guesses.max_picks = 0         # the planned layer's overhead: a taken guess skips it
            e.generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=4))
            ms = sorted(e.generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=32, stop_on_eos=False))
                        .stats.layer_meas_ms)
            medians.append(ms[len(ms) // 2])
    return medians[0], max(0.0, medians[1] - medians[0])


def main(argv: list[str] | None = None) -> None:
    ap = ArgParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--experts", default="bf16", choices=EXPERT_FORMATS,
                    help="expert weight format to calibrate (as run.py's --experts)")
    ap.add_argument("--out", help="where the calibration JSON goes (default: this machine's for the format, "
                                  "costs.json or costs-<format>.json in the cache folder)")
    ap.add_argument("--hidden", type=int, default=2048, help="expert shape (DeepSeek-V2-Lite: 2048)")
    ap.add_argument("--inter", type=int, default=1408, help="expert intermediate size (V2-Lite: 1408)")
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                    help="default: bfloat16 on a GPU, float32 on the CPU")
    ap.add_argument("--threads", type=at_least(1), help="CPU expert threads (default: all cores but one)")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,512", help="tokens per expert to measure")
    ap.add_argument("--cpu-kernel", default="auto",
                    choices=["auto", "native", "torch"], help="CPU-expert path to calibrate (as run.py's)")
    ap.add_argument("--cpu-pool", default="on", choices=["on", "off"],
                    help="native kernel on its own thread pool (as run.py's)")
    ap.add_argument("--cpu-tiles", default="auto", choices=["auto", "off"],
                    help="native kernel's AMX tile path for prefill-sized experts (as run.py's)")
    ap.add_argument("--cpu-prefetch", default="on", choices=["on", "off"],
                    help="the native kernel's software prefetch of the next weight rows (as run.py's)")
    ap.add_argument("--cpu-dot", default="auto", choices=["auto", "off"],
                    help="native kernel's bf16 dot-product path for decode-sized experts (as run.py's)")
    a = ap.parse_args(argv)
    a.out = a.out or str(default_path(a.experts))
    default_path().parent.mkdir(parents=True, exist_ok=True)
    check_paths(a, outputs=("out",))
    if a.device not in ("cpu", "cuda"):
        raise ConfigError(f"--device {a.device!r}: cpu or cuda")
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda asked for, but no CUDA GPU is visible")
    try:
        tokens = tuple(int(t) for t in a.tokens.split(","))
        assert min(tokens) >= 1
    except (ValueError, AssertionError):
        raise ConfigError(f"--tokens {a.tokens!r}: comma-separated integers >= 1") from None
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    pool = a.cpu_pool == "on"
    prefetch = a.cpu_prefetch == "on"
    if a.experts != "bf16" and (a.hidden % 32 or a.inter % 32 or a.experts == "q4k" and a.hidden % 256):
        raise ConfigError(f"--experts {a.experts} needs --hidden and --inter to be multiples of 32 (q4k: --hidden "
                          "of 256)")
    model = measure(device, a.hidden, a.inter, dtype, a.threads, tokens, kernel=a.cpu_kernel, pool=pool,
                    tiles=a.cpu_tiles, prefetch=prefetch, experts=a.experts, dot=a.cpu_dot)
    model.layer_overhead_ms, model.cpu_dispatch_ms = engine_overheads(device, str(dtype).split(".")[-1],
                                                                      a.cpu_kernel, pool, a.cpu_tiles, prefetch,
                                                                      a.experts, a.cpu_dot)
    model.to_json(a.out)
    print(json.dumps({"fetch_ms": round(model.fetch_ms, 4), "fetch_latency_ms": round(model.fetch_latency_ms, 4),
                      "layer_overhead_ms": round(model.layer_overhead_ms, 4),
                      "cpu_dispatch_ms": round(model.cpu_dispatch_ms, 4),
                      **{f"{k}@{n}": round(getattr(model, k)(n), 4) for k in ("gpu_ms", "cpu_ms", "xfer_ms")
                         for n in (1, 16, 128, 512)}}, indent=1))
    print(f"saved {a.out} for {model.fingerprint}")


if __name__ == "__main__":
    from hybrid.engine.errors import friendly
    friendly(main)

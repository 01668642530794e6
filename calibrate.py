"""Measure this machine's offloading costs once (PCIe copy, GPU and CPU expert time, transfers) for --mode hybrid.

    python calibrate.py                 # writes ~/.cache/hybrid-moe/costs.json for this machine
"""
from __future__ import annotations

import argparse
import json

import torch

from cost_model.measure import default_path, measure


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(default_path()))
    ap.add_argument("--hidden", type=int, default=2048, help="expert shape (DeepSeek-V2-Lite: 2048)")
    ap.add_argument("--inter", type=int, default=1408, help="expert intermediate size (V2-Lite: 1408)")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default on GPU) | float32 (default on CPU)")
    ap.add_argument("--threads", type=int, help="CPU expert threads (default: all cores but one)")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128,256,512")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA GPU is visible")
    dtype = getattr(torch, a.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    tokens = tuple(int(t) for t in a.tokens.split(","))
    model = measure(device, a.hidden, a.inter, dtype, a.threads, tokens)
    model.to_json(a.out)
    print(json.dumps({"fetch_ms": round(model.fetch_ms, 4), "layer_overhead_ms": round(model.layer_overhead_ms, 4),
                      **{f"{k}@{n}": round(getattr(model, k)(n), 4) for k in ("gpu_ms", "cpu_ms", "xfer_ms")
                         for n in (1, 16, 128, 512)}}, indent=1))
    print(f"saved {a.out} for {model.fingerprint}")


if __name__ == "__main__":
    main()

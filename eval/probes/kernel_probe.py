"""CPU-expert kernels side by side: ms per expert and weight bytes per second for the native kernel's vector path,
torch's path and, where the CPU has AMX, the kernel's tile path (alone and on the pool), over tokens per expert and
experts per call, weights cycling through more experts than the L3 holds (so they come from DRAM, as in the
runtime), while the copy stream moves experts to the GPU (as in the runtime). One JSON line per setting; each
kernel's max relative difference from torch's output is checked on the way.

    python eval/probes/kernel_probe.py [--threads 15] [--tokens 1,2,4,8,16] [--experts 1,4,16] [--out probe.json]"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from hybrid.kernels.cpu_experts import CpuExperts  # noqa: E402

H, I, N_HOST = 2048, 1408, 96
NUMEL = 3 * H * I


def views(host: torch.Tensor, js: list[int]):
    return [host[j][:2 * I * H].view(2 * I, H) for j in js], [host[j][2 * I * H:].view(H, I) for j in js]


def timed(run, host, dev, stream, tokens: int, experts: int, calls: int = 40) -> float:
    """Median ms per expert of one call over `experts` distinct experts with `tokens` tokens each."""
    x = torch.randn(tokens * experts, H).to(host.dtype)
    out = torch.empty_like(x)
    starts, counts = [j * tokens for j in range(experts)], [tokens] * experts
    times = []
    for c in range(calls):
        if stream is not None:
            with torch.cuda.stream(stream):
                for j in range(2):
                    dev.copy_(host[(5 * c + j) % N_HOST], non_blocking=True)
        w13, w2 = views(host, [(c * experts + j) % N_HOST for j in range(experts)])
        t = time.perf_counter()
        run(x, out, w13, w2, starts, counts)
        times.append(1000 * (time.perf_counter() - t) / experts)
    if stream is not None:
        stream.synchronize()
    return statistics.median(times[2:])


def max_rel_diff(a: CpuExperts, b: CpuExperts, host, tokens: int) -> float:
    x = torch.randn(tokens * 3, H).to(host.dtype)
    w13, w2 = views(host, [0, 1, 2])
    outs = []
    for k in (a, b):
        out = torch.empty_like(x)
        k.run(x, out, w13, w2, [0, tokens, 2 * tokens], [tokens] * 3)
        outs.append(out.float())
    return ((outs[0] - outs[1]).abs().max() / outs[1].abs().max()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=15)
    ap.add_argument("--tokens", default="1,2,4,8,16")
    ap.add_argument("--experts", default="1,4,16")
    ap.add_argument("--kernels", default="native,torch,amx,amx_pool",
                    help="which to time, of native, native_pool, torch, amx, amx_pool, amx_nopf, amx_pool_nopf "
                         "(torch's output is the reference)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    host = torch.empty(N_HOST, NUMEL, dtype=torch.bfloat16, pin_memory=cuda)
    host.copy_((torch.randn(NUMEL) * 0.02).bfloat16().expand(N_HOST, NUMEL))
    host[:3].copy_((torch.randn(3, NUMEL) * 0.02).bfloat16())
    dev = torch.empty(NUMEL, dtype=host.dtype, device="cuda") if cuda else None
    stream = torch.cuda.Stream() if cuda else None
    pool = {"pool_threads": a.threads - 1, "spin_us": 2000}          # as the runtime's CPU lane has it
    make = {"native": lambda: CpuExperts("native", max_tokens=1 << 30, tiles="off"),
            "native_pool": lambda: CpuExperts("native", max_tokens=1 << 30, tiles="off", **pool),
            "torch": lambda: CpuExperts("torch"),
            "amx": lambda: CpuExperts("native", max_tokens=0),       # the tile path at every token count
            "amx_pool": lambda: CpuExperts("native", max_tokens=0, **pool)}
    make.update({f"{k}_nopf": make[k] for k in ("amx", "amx_pool")})   # the same without software prefetch
    kernels = {k: make[k]() for k in a.kernels.split(",")}
    kernels = {k: v for k, v in kernels.items() if not k.startswith("amx") or v.tiles == 1}
    ref = kernels.get("torch") or make["torch"]()
    rows = []
    for tokens in [int(t) for t in a.tokens.split(",")]:
        diffs = {f"max_rel_diff_{k}": round(max_rel_diff(kernels[k], ref, host, tokens), 5)
                 for k in kernels if k != "torch"}
        for experts in [int(e) for e in a.experts.split(",")]:
            row = {"threads": a.threads, "tokens": tokens, "experts_per_call": experts, **diffs}
            for name, k in kernels.items():
                if k.lib is not None:
                    k.lib.moe_set_prefetch(int(not name.endswith("_nopf")))
                ms = timed(k.run, host, dev, stream, tokens, experts)
                row[f"{name}_ms"] = round(ms, 4)
                row[f"{name}_gb_s"] = round(NUMEL * 2 / ms / 1e6, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

"""Expert kernels per weight format on the GPU box: the grouped FFN over cache slots (bf16 torch._grouped_mm,
q8 / q4 Triton) at decode and prefill row counts, replayed from a CUDA graph where the runtime replays it, and
the native CPU kernel per format at 1-16 tokens per expert with weights from DRAM. Each GPU result is checked
against the dequantized reference. One JSON object with every row; a table at the end. `--cpu-only` times the CPU
kernel alone, one expert per call (with `--distinct 1 --threads 1`: one core's compute, the weights in cache), at
`--tokens` per expert, once per `--dot` setting (the bf16 dot-product path, cpu_dot.h) and `--tiles` setting (the
tile path, cpu_tiles.h, which quantized calls take above 8 tokens per expert where the CPU has AMX).

    python eval/probes/quant_kernel_probe.py [--out probe.json] [--cpu-only --threads 1 --distinct 1 --formats q4
        --dot off,auto --tiles off,auto --tokens 1,2,4]"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from itertools import product
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from eval.common import gpu_median_ms, meta  # noqa: E402
from hybrid.kernels.cpu_experts import CpuExperts  # noqa: E402
from hybrid.kernels.quant_gpu import torch_grouped_qffn, triton_grouped_qffn  # noqa: E402
from hybrid.model.config import ModelConfig  # noqa: E402
from hybrid.model.quant import expert_bytes, layout, quantize_expert, split_planes  # noqa: E402
from hybrid.model.synthetic import PRESETS  # noqa: E402
from hybrid.offload.resident import slot_ffn  # noqa: E402

CFG = ModelConfig.from_dict(PRESETS["v2-lite"][0])
H, I = CFG.hidden_size, CFG.moe_intermediate_size


def slots_for(fmt: str, n: int, device) -> torch.Tensor:
    one = [torch.randn(I, H) * 0.02, torch.randn(I, H) * 0.02, torch.randn(H, I) * 0.02]
    if fmt == "bf16":
        row = torch.cat([t.reshape(-1) for t in one]).bfloat16()
    else:
        row = quantize_expert(layout(CFG, fmt), *one)
    return row.to(device).expand(n, -1).contiguous()


def expert_views(quant, host: torch.Tensor) -> list[tuple]:
    """Each expert row of `host` (slots_for) as its (w13, w2): quantized planes, or bf16 matrices."""
    return [split_planes(quant, row) if quant else (row[:2 * I * H].view(2 * I, H), row[2 * I * H:].view(H, I))
            for row in host]


def gpu_ms(ffn, xs, offs, graph: bool, reps: int = 50) -> float:
    return gpu_median_ms(lambda: ffn(xs, offs), reps, graph)


# (bm, bn, bk, warps, stages); None: the default
TILES = [None, (16, 32, 256, 4, 3), (16, 64, 128, 4, 3), (16, 32, 128, 2, 3), (16, 32, 128, 4, 4)]
PREFILL_TILES = [None, (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 128, 128, 8, 2), (32, 128, 64, 4, 3),
                 (64, 64, 128, 4, 4), (128, 64, 64, 4, 3)]


def gpu_rows(fmt: str, S: int = 256) -> list[dict]:
    dev = torch.device("cuda")
    slots = slots_for(fmt, S, dev)
    quant = None if fmt == "bf16" else layout(CFG, fmt)
    rows = []
    for tokens, active in ((1, 6), (8, 6), (16, 6), (96, 48), (3072, 64)):       # rows per expert, experts
        counts = torch.zeros(S, dtype=torch.int64)
        counts[torch.arange(active) * (S // active)] = tokens
        offs = counts.cumsum(0).to(torch.int32).to(dev)
        xs = (torch.randn(int(counts.sum()), H, device=dev) * 0.5).bfloat16()
        ref = None if quant is None else torch_grouped_qffn(xs, offs.cpu(), slots, quant)
        tiles = [None] if quant is None else TILES if tokens * active <= 96 else PREFILL_TILES
        for tile in tiles:
            if tile is None:
                ffn = slot_ffn(slots, CFG, quant)
            else:
                ffn = lambda x, o, t=tile: triton_grouped_qffn(x, o, slots, quant, *t)  # noqa: E731
            try:
                err = None if ref is None else \
                    ((ffn(xs, offs).float() - ref.float()).norm() / ref.float().norm()).item()
                ms = gpu_ms(ffn, xs, offs, graph=tokens * active <= 96)
            except Exception as e:                          # one tile that does not compile is one row
                rows.append({"lane": "gpu", "format": fmt, "tile": tile, "error": repr(e)[-300:]})
                continue
            nbytes = active * expert_bytes(CFG, fmt, 2)
            rows.append({"lane": "gpu", "format": fmt, "tile": tile, "tokens_per_expert": tokens,
                         "experts": active, "ms": ms, "us_per_expert": 1000 * ms / active,
                         "weight_gb_s": nbytes / ms / 1e6, "rel_err": err})
    return rows


def cpu_rows(fmt: str, n_host: int = 96, threads: int = 15, per_call: int = 6,
             token_counts: tuple = (1, 4, 16), prefetch: bool = True, dot: str = "auto",
             tiles: str = "off") -> list[dict]:
    """`per_call` experts per kernel call, cycling through `n_host` distinct ones (1: one expert's weights stay
    in cache, the kernel's compute alone); dot, tiles: the dot-product and tile paths' settings."""
    quant = None if fmt == "bf16" else layout(CFG, fmt)
    host = slots_for(fmt, n_host, "cpu")
    k = CpuExperts("native", pool_threads=max(0, threads - 1), quant=quant, tiles=tiles, max_tokens=1 << 30,
                   dot=dot)
    k.lib.moe_set_prefetch(int(prefetch))
    torch.set_num_threads(threads)
    views = expert_views(quant, host)
    rows = []
    for tokens in token_counts:
        x = torch.randn(tokens * per_call, H).bfloat16()
        out = torch.empty_like(x)
        times = []
        for c in range(30):
            js = [(per_call * c + j) % n_host for j in range(per_call)]
            t = time.perf_counter()
            k.run(x, out, [views[j][0] for j in js], [views[j][1] for j in js],
                  [j * tokens for j in range(per_call)], [tokens] * per_call)
            times.append(1000 * (time.perf_counter() - t))
        ms = statistics.median(times[3:])
        rows.append({"lane": "cpu", "format": fmt, "tile": k.label, "tokens_per_expert": tokens,
                     "path": ("vector", "tiles", "tiles (emulated)")[k._mode(x, I, [tokens] * per_call) or 0],
                     "experts": per_call, "ms": ms,
                     "threads": threads, "distinct_experts": n_host, "us_per_expert": 1000 * ms / per_call,
                     "weight_gb_s": per_call * expert_bytes(CFG, fmt, 2) / ms / 1e6})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="quant_kernel_probe.json")
    ap.add_argument("--cpu-only", action="store_true", help="the CPU kernel alone (no GPU needed)")
    ap.add_argument("--threads", type=int, default=15)
    ap.add_argument("--distinct", type=int, default=96, help="distinct experts cycled through (1: in cache)")
    ap.add_argument("--formats", default="bf16,q8,q4")
    ap.add_argument("--per-call", type=int, default=1, help="--cpu-only: experts per kernel call")
    ap.add_argument("--no-prefetch", action="store_true", help="the kernel's software prefetch off")
    ap.add_argument("--dot", default="auto", help="--cpu-only: the dot-product path's settings, e.g. off,auto")
    ap.add_argument("--tiles", default="off", help="--cpu-only: the tile path's settings, e.g. off,auto")
    ap.add_argument("--tokens", default="1,2,4", help="--cpu-only: tokens per expert, e.g. 1,4,16")
    a = ap.parse_args()
    rows = []
    for fmt in a.formats.split(","):
        rows += [] if a.cpu_only else gpu_rows(fmt) + cpu_rows(fmt)
        for dot, tiles in product(a.dot.split(","), a.tiles.split(",")) if a.cpu_only else []:
            rows += cpu_rows(fmt, a.distinct, a.threads, a.per_call, tuple(map(int, a.tokens.split(","))),
                             not a.no_prefetch, dot, tiles)
    Path(a.out).write_text(json.dumps({**meta(), "rows": rows}, indent=1))
    print("lane format tile               tok/exp experts    ms  us/expert  GB/s  rel_err / path")
    for r in rows:
        if "error" in r:
            print(f"{r['lane']:4} {r['format']:5} {str(r['tile']):14} failed: {r['error'][-160:]}")
            continue
        err = r.get("path", "") if r.get("rel_err") is None else f"{r['rel_err']:.2e}"
        print(f"{r['lane']:4} {r['format']:5} {str(r.get('tile')):19}{r['tokens_per_expert']:7} {r['experts']:7} "
              f"{r['ms']:7.3f} {r['us_per_expert']:8.1f} {r['weight_gb_s']:7.1f}  {err}")


if __name__ == "__main__":
    main()

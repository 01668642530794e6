"""Decode-sized quantized expert FFNs on the GPU: quant_gpu's kernels (a whole reduction per program) against
quant_split's (the reduction cut across programs), replayed from CUDA graphs, at 1 row on 6 experts (batch 1) and
2 rows on 48 experts (about batch 16), per format and split setting; each output checked against quant_gpu's.

    python eval/probes/split_probe.py [--out split.json]"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eval.common import meta  # noqa: E402
from hybrid.kernels.quant_gpu import active_order, triton_grouped_qffn  # noqa: E402
from hybrid.kernels.quant_split import split_grouped_qffn  # noqa: E402
from hybrid.model.config import ModelConfig  # noqa: E402
from hybrid.model.quant import expert_bytes, layout, quantize_expert  # noqa: E402
from hybrid.model.synthetic import PRESETS  # noqa: E402

CFG = ModelConfig.from_dict(PRESETS["v2-lite"][0])
H, I = CFG.hidden_size, CFG.moe_intermediate_size
VARIANTS = [None, ((1, 1), 32, 4, True), ((1, 1), 64, 4, True), ((2, 2), 32, 4, True), ((4, 4), 32, 4, True),
            ((4, 4), 64, 4, True), ((4, 4), 64, 4, False)]
# None: quant_gpu's kernels; else (splits, bn, warps, one row block per slot)


def graph_us(fn, reps: int = 50) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(1000 * a.elapsed_time(b))
    return statistics.median(times)


def show(r: dict) -> None:
    head = f"{r['format']:4} {str(r['variant']):18} {r['tokens']}x{r['experts']:<3}"
    print(head, r["error"][-120:] if "error" in r else
          f"{r['us']:7.1f} us  {r['weight_gb_s']:6.0f} GB/s  err {r['rel_err_vs_quant_gpu']:.1e}", flush=True)


def rows_for(fmt: str, S: int = 64) -> list[dict]:
    lay = layout(CFG, fmt)
    one = quantize_expert(lay, torch.randn(I, H) * 0.02, torch.randn(I, H) * 0.02, torch.randn(H, I) * 0.02)
    slots = torch.stack([one] * S).cuda()
    out = []
    for tokens, active in ((1, 6), (2, 48)):
        counts = torch.zeros(S, dtype=torch.int64)
        counts[torch.randperm(S)[:active]] = tokens
        offs = counts.cumsum(0).to(torch.int32).cuda()
        xs = (torch.randn(int(counts.sum()), H, device="cuda") * 0.5).bfloat16()
        grouping = active_order(offs)
        ref = triton_grouped_qffn(xs, offs, slots, lay, grouping=grouping).float()
        for v in VARIANTS:
            if v is None:
                fn = lambda: triton_grouped_qffn(xs, offs, slots, lay, grouping=grouping)  # noqa: E731
            else:
                fn = lambda v=v: split_grouped_qffn(xs, offs, slots, lay, splits=v[0], bn=v[1], warps=v[2],  # noqa: E731
                                                    grouping=grouping, one_block=v[3])
            try:
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                us = graph_us(fn)
            except Exception as e:                      # a variant that does not compile is one row
                out.append({"format": fmt, "variant": v, "tokens": tokens, "experts": active, "error": repr(e)[-300:]})
                show(out[-1])
                continue
            out.append({"format": fmt, "variant": v, "tokens": tokens, "experts": active, "us": us,
                        "weight_gb_s": active * expert_bytes(CFG, fmt, 2) / us / 1e3, "rel_err_vs_quant_gpu": err})
            show(out[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="split_probe.json")
    ap.add_argument("--formats", default="q4,q4k,q8")
    a = ap.parse_args()
    rows = []
    for fmt in a.formats.split(","):
        rows += rows_for(fmt)
        Path(a.out).write_text(json.dumps({**meta(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

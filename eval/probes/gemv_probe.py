"""The grouped expert FFN at decode row counts on the GPU box: the tiled kernels (bf16 torch._grouped_mm, q8 / q4 /
q4k quant_gpu.py) against quant_gemv.py's matrix-vector kernels at several shapes, each replayed from a CUDA graph
and checked against the dequantized reference. Rows are T tokens x 6 picks routed at random over 64 slots, as
a decode step groups them. One JSON object with every row; a table at the end.

    python eval/probes/gemv_probe.py [--formats bf16,q8,q4,q4k] [--tokens 1,2,4,8,16] [--out gemv_probe.json]"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from eval.common import meta  # noqa: E402
from hybrid.kernels.quant_gemv import gemv_grouped_ffn  # noqa: E402
from hybrid.kernels.quant_gpu import torch_grouped_qffn, triton_grouped_qffn  # noqa: E402
from hybrid.model.config import ModelConfig  # noqa: E402
from hybrid.model.deepseek import gated_ffn, grouped_ffn  # noqa: E402
from hybrid.model.quant import expert_bytes, layout, quantize_expert  # noqa: E402
from hybrid.model.synthetic import PRESETS  # noqa: E402

CFG = ModelConfig.from_dict(PRESETS["v2-lite"][0])
H, I, S = CFG.hidden_size, CFG.moe_intermediate_size, 64
SHAPES = [(8, 8, 4, True), (16, 4, 4, True), (16, 8, 2, True), (16, 16, 4, True), (8, 8, 4, False),
          (16, 4, 4, False), (16, 8, 2, False), (8, 16, 4, False), (32, 4, 8, False)]
# (bn, groups, warps, weights rounded to bf16) of the matrix-vector kernels


def slots_for(fmt: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(S):
        one = [torch.randn(I, H, generator=g) * 0.02, torch.randn(I, H, generator=g) * 0.02,
               torch.randn(H, I, generator=g) * 0.02]
        rows.append(torch.cat([t.reshape(-1) for t in one]).bfloat16() if fmt == "bf16" else
                    quantize_expert(layout(CFG, fmt), *one))
    return torch.stack(rows).cuda()


def tiled(fmt: str, slots: torch.Tensor):
    if fmt != "bf16":
        return lambda xs, offs: triton_grouped_qffn(xs, offs, slots, layout(CFG, fmt))
    n = CFG.expert_numel
    w13 = slots.as_strided((S, 2 * I, H), (n, H, 1))
    w2 = slots.as_strided((S, H, I), (n, I, 1), 2 * I * H)
    return lambda xs, offs: grouped_ffn(xs, offs, w13, w2)


def reference(fmt: str, slots: torch.Tensor, xs, offs) -> torch.Tensor:
    if fmt != "bf16":
        return torch_grouped_qffn(xs.float(), offs.cpu(), slots, layout(CFG, fmt)).float()
    bounds = [0] + offs.tolist()
    w = slots.float()
    return torch.cat([gated_ffn(xs[a:b].float(), w[s, :2 * I * H].view(2 * I, H), w[s, 2 * I * H:].view(H, I))
                      for s, (a, b) in enumerate(zip(bounds, bounds[1:]))])


def graph_us(fn, reps: int = 100) -> float:
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


def rows_for(fmt: str, tokens: list[int]) -> list[dict]:
    slots, out = slots_for(fmt), []
    lay = None if fmt == "bf16" else layout(CFG, fmt)
    for T in tokens:
        picks = torch.stack([torch.randperm(S)[:6] for _ in range(T)]).reshape(-1)
        counts = torch.bincount(picks, minlength=S)
        offs = counts.cumsum(0).to(torch.int32).cuda()
        xs = (torch.randn(6 * T, H) * 0.5).bfloat16().cuda()
        ref = reference(fmt, slots, xs, offs)
        nbytes = int((counts > 0).sum()) * expert_bytes(CFG, fmt, 2)
        for shape in [None] + SHAPES:
            fn = (lambda: tiled(fmt, slots)(xs, offs)) if shape is None else \
                (lambda s=shape: gemv_grouped_ffn(xs, offs, slots, lay, bn=s[0], groups=s[1], warps=s[2],
                                                 round_weights=s[3]))
            try:
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                us = graph_us(fn)
            except Exception as e:            # a shape that does not compile is one row
                out.append({"format": fmt, "tokens": T, "shape": shape, "error": repr(e)[-300:]})
                continue
            out.append({"format": fmt, "tokens": T, "rows": 6 * T, "experts": int((counts > 0).sum()),
                        "kernel": "tiled" if shape is None else "gemv", "shape": shape, "us": us,
                        "weight_gb_s": nbytes / us / 1e3, "rel_err": err})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="bf16,q8,q4,q4k")
    ap.add_argument("--tokens", default="1,2,4,8,16")
    ap.add_argument("--out", default="gemv_probe.json")
    a = ap.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    rows = [r for fmt in a.formats.split(",") for r in rows_for(fmt, tokens)]
    Path(a.out).write_text(json.dumps({**meta(), "rows": rows}, indent=1))
    print("format tokens  tiled us  best gemv, rounded: us shape            not rounded: us shape            rel_err")
    for fmt in a.formats.split(","):
        for T in tokens:
            cell = [r for r in rows if r["format"] == fmt and r["tokens"] == T and "us" in r]
            tiled_us = [r["us"] for r in cell if r["kernel"] == "tiled"]
            best = [min((r for r in cell if r["kernel"] == "gemv" and r["shape"][3] == rnd), key=lambda r: r["us"],
                        default=None) for rnd in (True, False)]
            if not tiled_us or None in best:
                continue
            print(f"{fmt:6} {T:6} {tiled_us[0]:9.1f} {best[0]['us']:19.1f} {str(best[0]['shape'][:3]):14} "
                  f"{best[1]['us']:16.1f} {str(best[1]['shape'][:3]):14} {best[1]['rel_err']:.1e}")
    for r in rows:
        if "error" in r:
            print(f"{r['format']} {r['tokens']} {r['shape']} failed: {r['error'][-200:]}")


if __name__ == "__main__":
    main()

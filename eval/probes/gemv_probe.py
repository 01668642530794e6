"""The bf16 grouped expert FFN at decode row counts on the GPU box: torch._grouped_mm against gemv_ffn.py's
matrix-vector kernels at several shapes, each replayed from a CUDA graph and checked against an fp32 reference.
Rows are T tokens x 6 picks routed at random over 64 slots, as a decode step groups them. One JSON object with
every row; a table at the end.

    python eval/probes/gemv_probe.py [--tokens 1,2,4,8,16] [--out gemv_probe.json]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from eval.common import gpu_median_ms, meta  # noqa: E402
from hybrid.kernels.gemv_ffn import gemv_grouped_ffn  # noqa: E402
from hybrid.model.config import ModelConfig  # noqa: E402
from hybrid.model.deepseek import gated_ffn, grouped_ffn  # noqa: E402
from hybrid.model.quant import expert_bytes  # noqa: E402
from hybrid.model.synthetic import PRESETS  # noqa: E402

CFG = ModelConfig.from_dict(PRESETS["v2-lite"][0])
H, I, S = CFG.hidden_size, CFG.moe_intermediate_size, 64
SHAPES = [(8, 8, 4), (16, 8, 4), (16, 16, 4), (8, 16, 4), (16, 8, 2), (32, 4, 8)]   # (bn, groups, warps)


def slots_for() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(S, 3 * I * H, generator=g) * 0.02).bfloat16().cuda()


def tiled(slots: torch.Tensor):
    n = CFG.expert_numel
    w13 = slots.as_strided((S, 2 * I, H), (n, H, 1))
    w2 = slots.as_strided((S, H, I), (n, I, 1), 2 * I * H)
    return lambda xs, offs: grouped_ffn(xs, offs, w13, w2)


def reference(slots: torch.Tensor, xs, offs) -> torch.Tensor:
    bounds = [0] + offs.tolist()
    w = slots.float()
    return torch.cat([gated_ffn(xs[a:b].float(), w[s, :2 * I * H].view(2 * I, H), w[s, 2 * I * H:].view(H, I))
                      for s, (a, b) in enumerate(zip(bounds, bounds[1:]))])



def rows_for(tokens: list[int]) -> list[dict]:
    slots, out = slots_for(), []
    for T in tokens:
        picks = torch.stack([torch.randperm(S)[:6] for _ in range(T)]).reshape(-1)
        counts = torch.bincount(picks, minlength=S)
        offs = counts.cumsum(0).to(torch.int32).cuda()
        xs = (torch.randn(6 * T, H) * 0.5).bfloat16().cuda()
        ref = reference(slots, xs, offs)
        nbytes = int((counts > 0).sum()) * expert_bytes(CFG, "bf16", 2)
        for shape in [None] + SHAPES:
            fn = (lambda: tiled(slots)(xs, offs)) if shape is None else \
                (lambda s=shape: gemv_grouped_ffn(xs, offs, slots, bn=s[0], groups=s[1], warps=s[2]))
            try:
                err = ((fn().float() - ref).norm() / ref.norm()).item()
                us = 1000 * gpu_median_ms(fn, reps=100)
            except Exception as e:            # a shape that does not compile is one row
                out.append({"tokens": T, "shape": shape, "error": repr(e)[-300:]})
                continue
            out.append({"format": "bf16", "tokens": T, "rows": 6 * T, "experts": int((counts > 0).sum()),
                        "kernel": "grouped_mm" if shape is None else "gemv", "shape": shape, "us": us,
                        "weight_gb_s": nbytes / us / 1e3, "rel_err": err})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,2,4,8,16")
    ap.add_argument("--out", default="gemv_probe.json")
    a = ap.parse_args()
    tokens = [int(t) for t in a.tokens.split(",")]
    rows = rows_for(tokens)
    Path(a.out).write_text(json.dumps({**meta(), "rows": rows}, indent=1))
    print("tokens  grouped_mm us  best gemv us  shape         GB/s  rel_err (gemv ; grouped_mm)")
    for T in tokens:
        cell = [r for r in rows if r["tokens"] == T and "us" in r]
        mm = [r for r in cell if r["kernel"] == "grouped_mm"]
        best = min((r for r in cell if r["kernel"] == "gemv"), key=lambda r: r["us"], default=None)
        if mm and best:
            print(f"{T:6} {mm[0]['us']:14.1f} {best['us']:13.1f}  {str(best['shape']):12} "
                  f"{best['weight_gb_s']:6.0f}  {best['rel_err']:.1e} ; {mm[0]['rel_err']:.1e}")
    for r in rows:
        if "error" in r:
            print(f"{r['tokens']} {r['shape']} failed: {r['error'][-200:]}")


if __name__ == "__main__":
    main()

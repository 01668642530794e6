"""The fused decode-step kernels (hybrid/model/fused.py, fused_moe.py) on the GPU in bfloat16, against their torch
twins: how many outputs differ and by how much, and each one's time (eager launches, CUDA events) at decode and
prefill sizes; with --model, the whole model's logits through the kernels against the twins (rel. error, argmax
agreement).

    python eval/probes/fused_probe.py [--model DIR] [--out fused.json]"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from eval.common import meta  # noqa: E402
from hybrid.model import fused, fused_moe  # noqa: E402

HD, E, K, I = 2048, 64, 6, 1408        # V2-Lite's hidden size, routed experts, top-k, expert width


def twin(fn, *args):
    saved, fused.on_triton = fused.on_triton, (lambda t: False)
    try:
        return fn(*args)
    finally:
        fused.on_triton = saved


def timed_us(fn, *args, reps: int = 200) -> float:
    fn(*args)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn(*args)
    b.record()
    torch.cuda.synchronize()
    return 1000 * a.elapsed_time(b) / reps


def cases(T: int) -> dict:
    bf = dict(device="cuda", dtype=torch.bfloat16)
    x, d, w = torch.randn(T, HD, **bf), torch.randn(T, HD, **bf), torch.randn(HD, **bf)
    idx = torch.stack([torch.randperm(E, device="cuda")[:K] for _ in range(T)])
    return {"add_rms_norm": (lambda *a: fused.add_rms_norm(*a)[1], x, d, w, 1e-6),
            "silu_mul": (fused.silu_mul, torch.randn(T * K, 2 * I, **bf)),
            "route_topk": (lambda *a: fused_moe.route_topk(*a)[1].sort(-1).values, x,
                           torch.randn(E, HD, device="cuda").bfloat16().float(), K, True, 1.0),
            "group_by_expert": (lambda *a: torch.cat([t.reshape(-1).long() for t in fused_moe.group_by_expert(*a)]),
                                idx, E),
            "combine": (fused_moe.combine, torch.randn(T * K, HD, **bf),
                        torch.randperm(T * K, device="cuda").view(T, K).to(torch.int32),
                        torch.rand(T, K, device="cuda"))}


def op_rows() -> list[dict]:
    rows = []
    for T in (1, 16, 512):
        for name, (fn, *args) in cases(T).items():
            got, ref = fn(*args), twin(fn, *args)
            rows.append({"op": name, "tokens": T, "differ_frac": (got != ref).float().mean().item(),
                         "max_abs_diff": (got.float() - ref.float()).abs().max().item(),
                         "kernel_us": timed_us(fn, *args), "twin_us": timed_us(twin, fn, *args)})
    return rows


def model_rows(model: str) -> dict:
    from eval.common import DEFAULT_PROMPTS, load_prompts
    from hybrid.engine.engine import Engine
    from hybrid.engine.tokenizer import load_tokenizer
    from hybrid.model.config import RunConfig
    e = Engine(model, RunConfig(device="cuda", dtype="bfloat16", mode="gpu", experts="bf16", max_seq_len=128),
               progress=False)
    prompts = load_prompts(str(DEFAULT_PROMPTS), load_tokenizer(model), 64, 4)
    errs, agree = [], []
    for p in prompts:
        got, ref = e.logits(p).float(), twin(e.logits, p).float()
        errs.append(((got - ref).norm() / ref.norm()).item())
        agree.append((got.argmax(-1) == ref.argmax(-1)).float().mean().item())
    return {"logits_rel_err": errs, "argmax_agreement": agree}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", help="checkpoint for the whole-model check")
    ap.add_argument("--out")
    a = ap.parse_args()
    report = {**meta(), "ops": op_rows()}
    if a.model:
        report["model"] = model_rows(a.model)
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2, default=str))
    for r in report["ops"]:
        print(f"{r['op']:16s} T={r['tokens']:4d}  differ {r['differ_frac']:.4f}  max|d| {r['max_abs_diff']:.3g}  "
              f"kernel {r['kernel_us']:7.1f} us  twin {r['twin_us']:7.1f} us")
    if a.model:
        print("model logits rel err", [round(x, 5) for x in report["model"]["logits_rel_err"]],
              "argmax agreement", [round(x, 3) for x in report["model"]["argmax_agreement"]])


if __name__ == "__main__":
    main()

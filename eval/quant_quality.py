"""What quantizing the routed experts does to the model's outputs: q8 and q4 against the unquantized experts.

--count prompts of --tokens tokens from the prompt set go through the engine in mode gpu once per
expert format; per format, over every position: the logits' relative error against the unquantized run, the
top-1 agreement and the KL divergence KL(p_unquantized || p_format), in float32. On synthetic (random) weights these
say little about a trained model's quality: random experts have no structure for quantization error to disturb,
and near-flat logits flip their top-1 on small errors. Writes JSON (with run metadata) and prints a table.

    python eval/quant_quality.py --model DIR [--formats q8,q4] [--out eval/results/quant_h200/quality.json]"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from common import DEFAULT_PROMPTS, ROOT, load_prompts, meta, write_atomic
from hybrid.engine.cli import ArgParser, at_least, check_paths
from hybrid.engine.engine import Engine
from hybrid.engine.tokenizer import load_tokenizer
from hybrid.model.config import ConfigError, RunConfig


def all_logits(model: str, experts: str, prompts: list[list[int]], device: str, dtype: str) -> list[torch.Tensor]:
    e = Engine(model, RunConfig(device=device, dtype=dtype, mode="gpu", experts=experts,
                                max_seq_len=max(map(len, prompts))), progress=False)
    out = [e.logits(p).float().cpu() for p in prompts]
    del e
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out


def compare(ref: list[torch.Tensor], got: list[torch.Tensor]) -> dict:
    r, g = torch.cat(ref), torch.cat(got)                                                  # [positions, V]
    lp, lq = torch.log_softmax(r, -1), torch.log_softmax(g, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)                                                    # [positions]
    return {"positions": r.shape[0], "logits_rel_err": ((g - r).norm() / r.norm()).item(),
            "top1_agreement": (r.argmax(-1) == g.argmax(-1)).float().mean().item(),
            "kl_mean": kl.mean().item(), "kl_max": kl.max().item()}


def main(argv: list[str] | None = None) -> None:
    ap = ArgParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--tokenizer", help="tokenizer directory, or 'bytes' (default: the checkpoint's own)")
    ap.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="JSONL: {messages: [...]} or {text: ...}")
    ap.add_argument("--formats", default="q8,q4", help="comma-separated, of q8, q4")
    ap.add_argument("--tokens", type=at_least(1), default=256, help="tokens per prompt")
    ap.add_argument("--count", type=at_least(1), default=8, help="prompts (records continued or cut to --tokens)")
    ap.add_argument("--out", default=str(ROOT / "eval" / "results" / "quant_quality.json"), help="JSON output")
    a = ap.parse_args(argv)
    check_paths(a, inputs=("model", "prompts") + (() if a.tokenizer == "bytes" else ("tokenizer",)),
                outputs=("out",))
    formats = a.formats.split(",")
    if not formats or any(f not in ("q8", "q4") for f in formats):
        raise ConfigError(f"--formats {a.formats!r}: comma-separated, of q8, q4")
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    tok = load_tokenizer(a.model, a.tokenizer)
    prompts = load_prompts(a.prompts, tok, a.tokens, a.count)
    ref = all_logits(a.model, "bf16", prompts, device, dtype)
    rows = [{"experts": f, "dtype": dtype, **compare(ref, all_logits(a.model, f, prompts, device, dtype))}
            for f in formats]
    write_atomic(Path(a.out), json.dumps({"meta": meta(), "prompts": len(prompts), "rows": rows}, indent=1))
    print(f"{'experts':<8}{'positions':>10}{'logits err':>12}{'top-1 agree':>13}{'KL mean':>10}{'KL max':>9}")
    for r in rows:
        print(f"{r['experts']:<8}{r['positions']:>10}{r['logits_rel_err']:>12.4f}{r['top1_agreement']:>13.3f}"
              f"{r['kl_mean']:>10.4f}{r['kl_max']:>9.3f}")


if __name__ == "__main__":
    from hybrid.engine.errors import friendly
    friendly(main)

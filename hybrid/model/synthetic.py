"""Write synthetic DeepSeek-V2 checkpoints in the published Hugging Face layout, with seeded random weights.

    python -m hybrid.model.synthetic --preset v2-lite --out /dev/shm/v2lite [--tokenizer DIR]
"""
from __future__ import annotations

import argparse
import json
import queue
import shutil
import struct
import threading
from pathlib import Path

import torch
from tqdm import tqdm

from .checkpoint import INDEX_NAME
from .config import ModelConfig
from .layout import model_specs, numel

_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV2Config",
                 "AutoModel": "modeling_deepseek.DeepseekV2Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"},
    "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 100000,
    "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6,
    "num_hidden_layers": 27, "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400,
}
PRESETS: dict[str, tuple[dict, int]] = {   # name -> (config.json, number of shards)
    "v2-lite": (_V2_LITE, 4),
    "small": ({**_V2_LITE, "hidden_size": 256, "intermediate_size": 512, "kv_lora_rank": 64,
               "moe_intermediate_size": 128, "n_routed_experts": 16, "num_attention_heads": 4,
               "num_key_value_heads": 4, "num_experts_per_tok": 4, "num_hidden_layers": 6,
               "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32}, 2),
    "tiny": ({**_V2_LITE, "hidden_size": 64, "intermediate_size": 128, "kv_lora_rank": 32,
              "moe_intermediate_size": 32, "n_routed_experts": 16, "num_attention_heads": 4,
              "num_key_value_heads": 4, "num_experts_per_tok": 4, "num_hidden_layers": 4,
              "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16}, 3),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def split_shards(specs: dict[str, tuple], n: int, itemsize: int) -> list[list[str]]:
    """Consecutive tensors into n shards of about equal bytes (layers may straddle shards, as published)."""
    total = sum(numel(s) for s in specs.values()) * itemsize
    shards, acc = [[] for _ in range(n)], 0
    for name, shape in specs.items():
        shards[min(n - 1, acc * n // total)].append(name)
        acc += numel(shape) * itemsize
    return [s for s in shards if s]


def _header(names: list[str], specs: dict, dtype_tag: str, itemsize: int) -> bytes:
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        nbytes = numel(specs[name]) * itemsize
        header[name] = {"dtype": dtype_tag, "shape": list(specs[name]), "data_offsets": [off, off + nbytes]}
        off += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def _make(name: str, shape: tuple, seed: int, index: int, device: str, std: float) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, std, generator=g)
    return t.to(torch.bfloat16)


def _writer(q: queue.Queue, bar: tqdm) -> None:
    """Drains (file, tensor) items in order; (file, None) closes that file; None ends."""
    while (item := q.get()) is not None:
        f, t = item
        if t is None:
            f.close()
            continue
        t = t.cpu().contiguous()
        f.write(memoryview(t.view(torch.uint8).numpy()))
        bar.update(t.numel() * t.element_size())


def write_checkpoint(out: str | Path, config: dict, shards: int = 4, seed: int = 0, device: str = "cpu",
                     std: float = 0.02, tokenizer: str | Path | None = None, progress: bool = True) -> Path:
    """Write config.json, bf16 shards and the index; tensors stream to disk one at a time (low peak RAM)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(config)
    specs = model_specs(cfg)
    groups = split_shards(specs, shards, 2)
    files = [f"model-{k + 1:05d}-of-{len(groups):06d}.safetensors" for k in range(len(groups))]
    total = sum(numel(s) for s in specs.values()) * 2
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}", disable=not progress)
    q: queue.Queue = queue.Queue(maxsize=4)
    worker = threading.Thread(target=_writer, args=(q, bar), daemon=True)
    worker.start()
    index = 0
    for fname, names in zip(files, groups):
        f = open(out / fname, "wb")
        f.write(_header(names, specs, "BF16", 2))
        for name in names:
            q.put((f, _make(name, specs[name], seed, index, device, std)))
            index += 1
        q.put((f, None))
    q.put(None)
    worker.join()
    bar.close()
    weight_map = {name: fname for fname, names in zip(files, groups) for name in names}
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer is not None:
        copy_tokenizer(tokenizer, out)
    return out


def copy_tokenizer(src: str | Path, dst: Path) -> None:
    src = Path(src)
    found = [n for n in TOKENIZER_FILES if (src / n).exists()]
    if not found:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {src}")
    for n in found:
        shutil.copyfile(src / n, dst / n)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where random numbers are drawn (values depend on it; the GPU is much faster)")
    ap.add_argument("--tokenizer", help="copy tokenizer files from this directory into the checkpoint")
    a = ap.parse_args(argv)
    config, shards = PRESETS[a.preset]
    path = write_checkpoint(a.out, config, shards, a.seed, a.device, tokenizer=a.tokenizer)
    print(f"wrote {a.preset} checkpoint to {path}")


if __name__ == "__main__":
    main()

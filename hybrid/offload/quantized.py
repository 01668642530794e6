"""The routed experts of a checkpoint in a quantized format, made once and kept on disk.

`cache_dir()/quantized/<checkpoint identity>-<format>-v<QUANT_VERSION>.safetensors` holds one uint8 tensor per MoE
layer, "layer.<i>" [experts, bytes of one quantized expert] (quant.py's layout). The first run with a format
quantizes the checkpoint's experts into the host store (round to nearest, on threads, with a progress bar) and
writes the file; later runs read it straight into the store."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from ..model.checkpoint import Checkpoint
from ..model.config import ModelConfig, cache_dir
from ..model.quant import ExpertLayout, quantize_expert
from .resident import read_expert

QUANT_VERSION = 1             # bump when the quantizer or the layout changes: older files are not read


def quantized_path(ckpt: Checkpoint, fmt: str) -> Path:
    return cache_dir() / "quantized" / f"{ckpt.identity()}-{fmt}-v{QUANT_VERSION}.safetensors"


def read_file(path: Path, flat: torch.Tensor, layers: dict[int, int], progress: bool) -> bool:
    """Fill flat[row] from the file's "layer.<i>" tensors; False (flat untouched) if the file does not fit."""
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        if any(f"layer.{layer}" not in names for layer in layers):
            return False
        shapes = [tuple(f.get_slice(f"layer.{layer}").get_shape()) for layer in layers]
        if any(s != tuple(flat.shape[1:]) for s in shapes):
            return False
        for layer, row in tqdm(layers.items(), desc=f"experts <- {path.name}", disable=not progress):
            flat[row].copy_(f.get_tensor(f"layer.{layer}"))
    return True


def _on_threads(work, items: list, threads: int, desc: str, progress: bool) -> None:
    """work(item) for every item on `threads` threads, with a progress bar."""
    with ThreadPoolExecutor(threads) as ex:
        for _ in tqdm(ex.map(work, items), total=len(items), desc=desc, disable=not progress):
            pass


def quantize_into(flat: torch.Tensor, layers: dict[int, int], ckpt: Checkpoint, lay: ExpertLayout,
                  progress: bool, threads: int) -> None:
    def one(key: tuple[int, int]) -> None:
        layer, e = key
        flat[layers[layer], e].copy_(quantize_expert(lay, *read_expert(ckpt, layer, e)))
    keys = [(layer, e) for layer in layers for e in range(flat.shape[1])]
    _on_threads(one, keys, threads, f"quantizing experts to {lay.fmt}", progress)


def carry_into(flat: torch.Tensor, layers: dict[int, int], ckpt, lay: ExpertLayout, progress: bool,
               threads: int, layouts: dict[int, ExpertLayout] | None = None) -> None:
    """A GGUF's experts, block for block (no requantizing: gguf_checkpoint.layer_planes), a layer per thread, each
    in its layout in `layouts` (default: lay), at the start of its rows."""
    def one(layer: int) -> None:
        own = (layouts or {}).get(layer, lay)
        flat[layers[layer], :, :own.nbytes].copy_(ckpt.layer_planes(layer, own))
    _on_threads(one, list(layers), threads, f"experts <- {ckpt.path.name}", progress)


def load_quantized(flat: torch.Tensor, layers: dict[int, int], cfg: ModelConfig, ckpt: Checkpoint,
                   lay: ExpertLayout, progress: bool = True, threads: int = 8,
                   layouts: dict[int, ExpertLayout] | None = None) -> Path:
    """Fill flat [moe layers, experts, lay.nbytes] (uint8) with the checkpoint's experts in lay.fmt: carried from
    a GGUF's blocks (a layer in `layouts` in its own, no larger than lay), from the file kept on disk, or quantized
    now (then written there). -> the file's path."""
    if hasattr(ckpt, "layer_planes"):
        carry_into(flat, layers, ckpt, lay, progress, threads, layouts)
        return ckpt.path
    path = quantized_path(ckpt, lay.fmt)
    if path.exists() and read_file(path, flat, layers, progress):
        return path
    quantize_into(flat, layers, ckpt, lay, progress, threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({f"layer.{layer}": flat[row] for layer, row in layers.items()}, str(tmp),
              metadata={"format": lay.fmt, "version": str(QUANT_VERSION), "experts": str(cfg.n_routed_experts)})
    os.replace(tmp, path)
    return path

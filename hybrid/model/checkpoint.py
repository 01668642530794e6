"""Read a Hugging Face safetensors checkpoint lazily, tensor by tensor, with clear errors for broken files."""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig

INDEX_NAME = "model.safetensors.index.json"
FLOAT_DTYPES = ("BF16", "F16", "F32")           # what the weights may be stored as (computed in the run's dtype)
SINGLE_NAME = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be read as it is, with the file and the problem named."""


def read_header(path: Path) -> tuple[dict, int]:
    """The safetensors JSON header of one file and the offset where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"shard {path.name} is truncated: {path.stat().st_size} bytes, no header")
        (n,) = struct.unpack("<Q", raw)
        size = path.stat().st_size
        if n > size - 8:
            raise CheckpointError(f"shard {path.name} is corrupt: its header claims {n} bytes, the file has {size}")
        blob = f.read(n)
    if len(blob) < n:
        raise CheckpointError(f"shard {path.name} is truncated inside its header")
    try:
        header = json.loads(blob)
    except json.JSONDecodeError:
        raise CheckpointError(f"shard {path.name} has a corrupt header (not a safetensors file?)") from None
    return header, 8 + n


def check_shard(path: Path) -> dict:
    """Parse a shard's header and check that the file holds every byte the header promises."""
    if not path.exists():
        raise CheckpointError(f"missing shard {path.name} in {path.parent}")
    header, start = read_header(path)
    header.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in header.values()), default=0)
    size = path.stat().st_size
    if size < start + end:
        raise CheckpointError(
            f"shard {path.name} is truncated: {size} bytes on disk, its header needs {start + end}")
    return header


class Checkpoint:
    """A checkpoint directory: config.json, the index and its shards; tensors are read lazily by name."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.path} does not exist")
        self.config = ModelConfig.from_json(self.path / "config.json")
        self.weight_map = self._read_weight_map()
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for shard in sorted(set(self.weight_map.values())):
            header = check_shard(self.path / shard)
            for name, meta in header.items():
                self.shapes[name] = tuple(meta["shape"])
                self.dtypes[name] = meta["dtype"]
        absent = [n for n in self.weight_map if n not in self.shapes]
        if absent:
            raise CheckpointError(f"tensor {absent[0]} is listed in the index but missing from "
                                  f"{self.weight_map[absent[0]]} ({len(absent)} missing)")
        self._handles: dict[str, object] = {}

    def _read_weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_NAME
        if index.exists():
            try:
                return dict(json.loads(index.read_text())["weight_map"])
            except (json.JSONDecodeError, KeyError):
                raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map)") from None
        single = self.path / SINGLE_NAME
        if single.exists():
            return {name: SINGLE_NAME for name in check_shard(single)}
        raise CheckpointError(f"no {INDEX_NAME} or {SINGLE_NAME} in {self.path}")

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, shard: str):
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self.path / shard), framework="pt")
        return self._handles[shard]

    def get(self, name: str) -> torch.Tensor:
        """One tensor by name, read through mmap (nothing else in its shard is touched)."""
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name} is not in the checkpoint at {self.path}")
        return self._handle(self.weight_map[name]).get_tensor(name)

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Fail with the first tensor whose presence, shape or dtype differs from what the config implies."""
        for name, shape in expected.items():
            if name not in self.shapes:
                raise CheckpointError(f"tensor {name} is missing from the checkpoint")
            if self.shapes[name] != tuple(shape):
                raise CheckpointError(f"tensor {name} has shape {list(self.shapes[name])}, "
                                      f"expected {list(shape)} from config.json")
            if self.dtypes[name] not in FLOAT_DTYPES:
                raise CheckpointError(f"tensor {name} is stored as {self.dtypes[name]}; weights must be one of "
                                      f"{', '.join(FLOAT_DTYPES)}")

    def native_format(self) -> str:
        """The expert format the weights are stored in (`--experts auto`): a Hugging Face checkpoint's are bf16."""
        return "bf16"

    def identity(self) -> str:
        """16 hex digits naming the weights: config.json plus the first router's values (synthetic checkpoints
        of one preset differ only in values). Keys predictors and sweep results."""
        first = self.config.moe_layers[0]
        h = hashlib.sha1((self.path / "config.json").read_bytes())
        h.update(self.get(f"model.layers.{first}.mlp.gate.weight").float().numpy().tobytes())
        return h.hexdigest()[:16]

    def expert_names(self, layer: int, expert: int) -> tuple[str, str, str]:
        p = f"model.layers.{layer}.mlp.experts.{expert}"
        return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"

"""Shared fixtures: one tiny synthetic checkpoint per session and the transformers reference on it."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["TRITON_INTERPRET"] = "1"      # Triton kernels run in its interpreter, on CPU tensors (read at import)

from hybrid.model.quant import expert_bytes  # noqa: E402
from hybrid.offload.budget import plan_memory  # noqa: E402
from hybrid.model.checkpoint import Checkpoint  # noqa: E402
from hybrid.model.config import RunConfig  # noqa: E402
from hybrid.engine.engine import Engine  # noqa: E402
from hybrid.offload.runtime import staging_slots  # noqa: E402
from hybrid.model.synthetic import PRESETS, write_checkpoint  # noqa: E402
from hybrid.engine.tokenizer import find_tokenizer_dir  # noqa: E402

PROMPTS = [[100000, 549, 6077, 280, 7239, 317, 11, 22, 33, 44, 55, 66], [5, 6, 7], [9, 8, 7, 6, 5, 4, 3]]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    config, shards = PRESETS["tiny"]
    return write_checkpoint(tmp_path_factory.mktemp("tiny"), config, shards, seed=1, progress=False)


@pytest.fixture(scope="session")
def wide(tmp_path_factory) -> Path:
    """The tiny model with rows of 256 (Q4_K's block) and a small vocabulary."""
    config, shards = PRESETS["tiny"]
    config = {**config, "hidden_size": 256, "vocab_size": 1024, "bos_token_id": 1, "eos_token_id": 2}
    return write_checkpoint(tmp_path_factory.mktemp("wide"), config, shards, seed=2, progress=False)


@pytest.fixture(scope="session")
def wide128(tmp_path_factory) -> Path:
    """The tiny model with sizes in whole blocks of 128 (the CPU kernel's dot-product path) and a small vocabulary."""
    config, shards = PRESETS["tiny"]
    config = {**config, "hidden_size": 256, "moe_intermediate_size": 128, "vocab_size": 1024, "bos_token_id": 1,
              "eos_token_id": 2}
    return write_checkpoint(tmp_path_factory.mktemp("wide128"), config, shards, seed=3, progress=False)


@pytest.fixture(scope="session")
def reference(tiny):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer_dir():
    path = find_tokenizer_dir()
    if path is None:
        pytest.skip("no tokenizer files found (../shared/tokenizer or $HYBRID_TOKENIZER)")
    return path


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def budget_for(tiny, slots, batch=3, seq=128, experts="bf16", scratch=0, itemsize=4):
    """A --gpu-memory for the checkpoint that leaves exactly `slots` expert-cache slots (float32, or the dtype of
    `itemsize` bytes; no margin), with a prefill scratch of `scratch` experts for quantized ones (pass the same as
    RunConfig.prefill_scratch)."""
    cfg = Checkpoint(tiny).config
    p = plan_memory(cfg, 1 << 40, batch, seq, itemsize, 4096, staging_slots(cfg), margin=0,
                    slot_bytes=expert_bytes(cfg, experts, itemsize),
                    scratch_expert=0 if experts == "bf16" else cfg.expert_numel * itemsize, scratch_experts=scratch)
    return p.budget - (p.n_slots - slots) * p.slot_bytes


def make(tiny, **kw):
    """An engine on the checkpoint in float32, batch up to 3, 128 tokens of context, with RunConfig fields `kw`."""
    run = RunConfig(**{"dtype": "float32", "max_batch_size": 3, "max_seq_len": 128, **kw})
    return Engine(str(tiny), run, progress=False)

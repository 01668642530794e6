"""Bad input fails with an error that names the problem."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from hybrid.budget import BudgetError, check_host_ram, plan_memory
from hybrid.checkpoint import Checkpoint, CheckpointError
from hybrid.config import ConfigError, RunConfig
from hybrid.engine import Engine, EngineError


@pytest.fixture
def copy(tiny, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny, dst)
    return dst


def shards(path):
    return sorted(path.glob("model-*.safetensors"))


def test_missing_shard(copy):
    victim = shards(copy)[-1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard {victim.name}"):
        Checkpoint(copy)


def test_truncated_shard(copy):
    victim = shards(copy)[0]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=f"shard {victim.name} is truncated"):
        Checkpoint(copy)


def test_tensor_with_wrong_shape(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["moe_intermediate_size"] = 48
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp.experts.0.gate_proj.weight has shape \[32, 64\], expected \[48, 64\]"):
        Engine(str(copy), RunConfig(dtype="float32"), progress=False)


def test_unknown_model_type(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg["model_type"] = "llama"
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown model_type 'llama'"):
        Checkpoint(copy)


def test_missing_config_field(copy):
    cfg = json.loads((copy / "config.json").read_text())
    del cfg["kv_lora_rank"]
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="kv_lora_rank"):
        Checkpoint(copy)


def test_prompt_longer_than_context(tiny):
    e = Engine(str(tiny), RunConfig(dtype="float32", max_seq_len=16), progress=False)
    with pytest.raises(EngineError, match="prompt of 20 tokens \\+ 4 new tokens exceeds the context of 16"):
        e.generate([[1] * 20], __import__("hybrid.sampling").sampling.SamplingParams(max_new_tokens=4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_no_cuda_for_a_gpu_device(tiny):
    with pytest.raises(EngineError, match="no CUDA GPU is visible"):
        Engine(str(tiny), RunConfig(device="cuda"), progress=False)


def test_budget_too_small_for_non_expert_weights(tiny):
    cfg = Checkpoint(tiny).config
    with pytest.raises(BudgetError, match="too small: the non-expert weights need"):
        plan_memory(cfg, 10 * 2**20, 1, 64, 4, 4096, 8, margin=0)


def test_host_ram_too_small():
    with pytest.raises(BudgetError, match="host RAM too small for the routed-expert store: it needs 26.80 GiB"):
        check_host_ram(int(26.8 * 2**30), 16 * 2**30)


def test_cli_reports_errors_in_one_line(copy):
    shards(copy)[0].unlink()
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "--model", str(copy), "--device", "cpu"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: missing shard")
    assert "Traceback" not in r.stderr

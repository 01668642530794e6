"""Bad input fails with an error that names the problem."""
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import ROOT
from hybrid.offload.budget import BudgetError, check_host_ram, plan_memory
from hybrid.model.checkpoint import Checkpoint, CheckpointError
from hybrid.model.config import ConfigError, RunConfig
from hybrid.engine.engine import Engine, EngineError
from hybrid.engine.sampling import SamplingParams


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
        e.generate([[1] * 20], SamplingParams(max_new_tokens=4))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_no_cuda_for_a_gpu_device(tiny):
    with pytest.raises(EngineError, match="no CUDA GPU is visible"):
        Engine(str(tiny), RunConfig(device="cuda"), progress=False)
    import serve                     # the server's setting key does not ask torch for a GPU that is not there
    with pytest.raises(EngineError, match="no CUDA GPU is visible"):
        serve.build(["--model", str(tiny), "--device", "cuda", "--tokenizer", "bytes"])


def test_a_gpu_index_past_the_visible_ones_is_named(tiny, monkeypatch):
    """(With two GPUs faked:) "cuda" is the current one and "cuda:1" the second, each made current by its index
    (set_device refuses a device without one); "cuda:2" is one error line."""
    import torch
    from hybrid.engine.engine import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    made = []
    monkeypatch.setattr(torch.cuda, "set_device", made.append)
    assert (resolve_device("cuda"), resolve_device("cuda:1"), made) == (torch.device("cuda:0"), torch.device("cuda:1"),
                                                                        [0, 1])
    with pytest.raises(EngineError, match=r"'cuda:2' asked for, but the visible GPUs are cuda:0 to cuda:1"):
        resolve_device("cuda:2")
    import serve                     # the server names it too, before anything asks torch for the GPU's name
    with pytest.raises(EngineError, match="visible GPUs are cuda:0 to cuda:1"):
        serve.build(["--model", str(tiny), "--device", "cuda:2", "--tokenizer", "bytes"])


def test_budget_too_small_for_non_expert_weights(tiny):
    cfg = Checkpoint(tiny).config
    with pytest.raises(BudgetError, match="too small: the non-expert weights on the GPU need"):
        plan_memory(cfg, 10 * 2**20, 1, 64, 4, 4096, 8, margin=0)


def test_host_ram_too_small():
    with pytest.raises(BudgetError, match="host RAM too small for the routed-expert store: it needs 26.80 GiB"):
        check_host_ram(int(26.8 * 2**30), 16 * 2**30)


def test_cli_reports_errors_in_one_line(copy):
    shards(copy)[0].unlink()
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "--model", str(copy), "--device", "cpu",
                        "--tokenizer", "bytes"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().startswith("error: missing shard")
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", "256", "hidden_size must be an integer, got \"256\""),
    ("num_hidden_layers", 4.0, "num_hidden_layers must be an integer, got 4.0"),
    ("rope_scaling", "yarn", "rope_scaling must be an object or null, got \"yarn\""),
    ("n_routed_experts", "16", "n_routed_experts must be an integer"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps must be a number"),
    ("norm_topk_prob", "yes", "norm_topk_prob must be true or false"),
    ("num_experts_per_tok", 0, "num_experts_per_tok must be at least 1, got 0"),
    ("n_group", 3, r"n_group \(3\) must divide n_routed_experts \(16\)"),
    ("topk_group", 2, r"topk_group must be between 1 and n_group \(1\), got 2"),
])
def test_config_fields_of_the_wrong_type_or_range(copy, field, value, message):
    cfg = json.loads((copy / "config.json").read_text())
    cfg[field] = value
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=message):
        Checkpoint(copy)


def test_group_limited_routing_must_keep_enough_experts(copy):
    cfg = json.loads((copy / "config.json").read_text())
    cfg.update(topk_method="group_limited_greedy", n_group=8, topk_group=1)      # 2 experts kept, 4 routed
    (copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match=r"keeps 1 of 8 groups \(2 experts\), fewer than num_experts_per_tok \(4\)"):
        Checkpoint(copy)


def test_a_huge_safetensors_header_length_is_a_clear_error(copy):
    victim = shards(copy)[0]
    data = bytearray(victim.read_bytes())
    data[:8] = (2**60).to_bytes(8, "little")
    victim.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"shard {victim.name} is corrupt: its header claims {2**60} bytes"):
        Checkpoint(copy)


def test_an_integer_expert_tensor_is_refused(copy):
    from safetensors.torch import load_file, save_file
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    index = json.loads((copy / "model.safetensors.index.json").read_text())["weight_map"]
    shard = copy / index[name]
    tensors = load_file(shard)
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=f"tensor {name} is stored as I32; weights must be one of BF16, F16, F32"):
        Engine(str(copy), RunConfig(dtype="float32"), progress=False)


def run_cli(argv, capsys):
    """run.py in this process, as its __main__ calls it: -> (exit code, stderr)."""
    import run
    from hybrid.engine.errors import friendly
    with pytest.raises(SystemExit) as exit_:
        friendly(lambda: run.main(argv))
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    (["--batch-size", "-1"], "argument --batch-size: must be at least 1, got -1"),
    (["--max-new-tokens", "-1"], "argument --max-new-tokens: must be at least 1, got -1"),
    (["--temperature", "-1"], "temperature must be a finite number >= 0 (0: greedy), got -1.0"),
    (["--temperature", "1", "--top-p", "0"], "top_p must be in (0, 1], got 0.0"),
    (["--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
    (["--device", "tpu"], "device 'tpu' is not supported: cpu, cuda or cuda:N"),
    (["--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
    (["--gpu-memory", "0GiB"], "cannot read '0GiB' as a positive size"),
    (["--json", "/no/such/dir/s.json"], "--json /no/such/dir/s.json: the folder /no/such/dir does not exist"),
    (["--costs", "/no/such/costs.json"], "--costs /no/such/costs.json: no such file or directory"),
    (["--prompts", "/no/such/p.jsonl"], "--prompts /no/such/p.jsonl: no such file or directory"),
])
def test_bad_arguments_fail_in_one_line_before_loading(tiny, capsys, argv, message):
    code, err = run_cli(["--model", str(tiny), "--device", "cpu", *argv], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "weights -> device" not in err                      # nothing was loaded


def test_a_model_without_tokenizer_needs_one_named(tiny, tmp_path, capsys, monkeypatch):
    import hybrid.engine.tokenizer as tk
    monkeypatch.setattr(tk, "SEARCH", ())                     # no shared tokenizer on this machine
    code, err = run_cli(["--model", str(tiny), "--device", "cpu"], capsys)
    assert code == 2 and err.startswith("error: no tokenizer.json in") and "--tokenizer bytes" in err


def test_a_named_calibration_file_must_exist(tiny):
    with pytest.raises(ConfigError, match="calibration file /no/such/costs.json does not exist"):
        Engine(str(tiny), RunConfig(dtype="float32", mode="hybrid", costs_path="/no/such/costs.json"), progress=False)


def test_mode_auto_leaves_a_margin_and_refuses_a_full_gpu():
    from hybrid.offload.runtime import AUTO_MARGIN, auto_budget
    assert auto_budget(8 * 2**30, None) == 8 * 2**30 - AUTO_MARGIN
    assert auto_budget(8 * 2**30, 3 * 2**30) == 3 * 2**30                    # --gpu-memory wins
    with pytest.raises(BudgetError, match="mode auto: only 300.0 MiB of GPU memory is free"):
        auto_budget(300 * 2**20, None)


def test_running_out_of_gpu_memory_inside_the_budget_is_one_line_not_a_traceback(capsys):
    from hybrid.engine.errors import friendly

    def main():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 MiB.\nmore detail")
    with pytest.raises(SystemExit) as exit_:
        friendly(main)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 1 and len(lines) == 1 and lines[0].startswith("error: the GPU ran out of memory")
    assert "Tried to allocate 32.00 MiB" in lines[0] and "--gpu-memory" in lines[0]

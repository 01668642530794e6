"""The v2-lite preset has the published checkpoint's names, shapes, count and size (FACTS.md), without writing it."""
from hybrid.model.config import ModelConfig
from hybrid.model.layout import model_specs, numel
from hybrid.model.synthetic import PRESETS, split_shards

FACTS = {  # per layer i unless said; written out independently of hybrid/model/layout.py
    "model.embed_tokens.weight": (102400, 2048), "lm_head.weight": (102400, 2048), "model.norm.weight": (2048,),
    "input_layernorm.weight": (2048,), "post_attention_layernorm.weight": (2048,),
    "self_attn.q_proj.weight": (3072, 2048), "self_attn.kv_a_proj_with_mqa.weight": (576, 2048),
    "self_attn.kv_a_layernorm.weight": (512,), "self_attn.kv_b_proj.weight": (4096, 512),
    "self_attn.o_proj.weight": (2048, 2048),
}


def expected() -> dict:
    out = {k: v for k, v in FACTS.items() if k.startswith(("model.", "lm_head"))}
    for i in range(27):
        for k, v in FACTS.items():
            if not k.startswith(("model.", "lm_head")):
                out[f"model.layers.{i}.{k}"] = v
        if i == 0:
            for n, s in (("gate_proj", (10944, 2048)), ("up_proj", (10944, 2048)), ("down_proj", (2048, 10944))):
                out[f"model.layers.0.mlp.{n}.weight"] = s
            continue
        out[f"model.layers.{i}.mlp.gate.weight"] = (64, 2048)
        for n, s in (("gate_proj", (2816, 2048)), ("up_proj", (2816, 2048)), ("down_proj", (2048, 2816))):
            out[f"model.layers.{i}.mlp.shared_experts.{n}.weight"] = s
        for j in range(64):
            for n, s in (("gate_proj", (1408, 2048)), ("up_proj", (1408, 2048)), ("down_proj", (2048, 1408))):
                out[f"model.layers.{i}.mlp.experts.{j}.{n}.weight"] = s
    return out


def test_v2_lite_names_and_shapes_equal_the_published_table():
    config, shards = PRESETS["v2-lite"]
    specs = model_specs(ModelConfig.from_dict(config))
    assert specs == expected()
    assert len(specs) == 5291
    assert sum(numel(s) for s in specs.values()) == 15_706_484_224
    groups = split_shards(specs, shards, 2)
    assert len(groups) == 4 and sum(len(g) for g in groups) == 5291


def test_v2_lite_config_is_the_published_one():
    config, _ = PRESETS["v2-lite"]
    cfg = ModelConfig.from_dict(config)
    assert abs(cfg.softmax_scale - 0.114721) < 1e-6
    assert cfg.moe_layers == list(range(1, 27))
    assert cfg.expert_numel * 2 == 17_301_504


def test_the_gpu_budget_counts_every_non_expert_weight_but_the_host_embedding_table():
    from hybrid.model.layout import device_weight_numel, non_expert_numel
    from hybrid.offload.budget import plan_memory
    cfg = ModelConfig.from_dict(PRESETS["v2-lite"][0])
    assert non_expert_numel(cfg) - device_weight_numel(cfg) == 102400 * 2048
    plan = plan_memory(cfg, 12 * 2**30, 1, 512, 2, 4096, 18)
    assert plan.non_expert == device_weight_numel(cfg) * 2 and 2.0 < plan.non_expert / 2**30 < 2.1


def test_the_budget_picks_a_prefill_chunk_and_graphs_that_leave_the_experts_room():
    """Unset, the prefill chunk and prefill graphs shrink with the budget: at 8 GiB (V2-Lite, q4k, batch 1,
    4,096-token context) the expert cache gets 15% more slots than with 4,096-token chunks and 512-token
    graphs; without a budget (the CPU) the largest are kept; a value the user set is kept."""
    import torch
    from dataclasses import replace
    from hybrid.model.config import RunConfig
    from hybrid.offload.runtime import memory_plan, with_workspace
    cfg = ModelConfig.from_dict(PRESETS["v2-lite"][0])
    run = RunConfig(device="cpu", mode="hybrid", experts="q4k", gpu_memory=8 * 2**30, dtype="bfloat16")
    auto = with_workspace(cfg, run, torch.device("cuda"), 2, 0)                     # no CUDA call: a budget is set
    assert auto.prefill_chunk_tokens == 1024 and auto.prefill_graph_tokens == 512
    small = with_workspace(cfg, replace(run, gpu_memory=4 * 2**30), torch.device("cuda"), 2, 0)
    assert small.prefill_chunk_tokens == 512 and small.prefill_graph_tokens == 256
    fixed = replace(run, prefill_chunk_tokens=4096, prefill_graph_tokens=512)
    assert with_workspace(cfg, fixed, torch.device("cuda"), 2, 0) == fixed
    slots = [memory_plan(cfg, r, torch.device("cuda"), 2, 2**29).n_slots for r in (run, fixed)]   # 0.5 GiB context
    assert slots[0] > 1.15 * slots[1], slots
    free = with_workspace(cfg, replace(run, gpu_memory=None), torch.device("cpu"), 2, 0)
    assert free.prefill_chunk_tokens == 4096 and free.prefill_graph_tokens == 512

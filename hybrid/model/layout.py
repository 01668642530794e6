"""The tensor names and shapes that a DeepSeek-V2 config implies (the published checkpoint layout)."""
from __future__ import annotations

from .config import ModelConfig


def attention_specs(cfg: ModelConfig, i: int) -> dict[str, tuple[int, ...]]:
    p, h = f"model.layers.{i}.self_attn", cfg.hidden_size
    q_out = cfg.num_attention_heads * cfg.qk_head_dim
    specs = {}
    if cfg.q_lora_rank is None:
        specs[f"{p}.q_proj.weight"] = (q_out, h)
    else:
        specs[f"{p}.q_a_proj.weight"] = (cfg.q_lora_rank, h)
        specs[f"{p}.q_a_layernorm.weight"] = (cfg.q_lora_rank,)
        specs[f"{p}.q_b_proj.weight"] = (q_out, cfg.q_lora_rank)
    specs[f"{p}.kv_a_proj_with_mqa.weight"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
    specs[f"{p}.kv_a_layernorm.weight"] = (cfg.kv_lora_rank,)
    specs[f"{p}.kv_b_proj.weight"] = (cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                      cfg.kv_lora_rank)
    specs[f"{p}.o_proj.weight"] = (h, cfg.num_attention_heads * cfg.v_head_dim)
    return specs


def mlp_specs(prefix: str, hidden: int, inter: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.gate_proj.weight": (inter, hidden), f"{prefix}.up_proj.weight": (inter, hidden),
            f"{prefix}.down_proj.weight": (hidden, inter)}


def layer_specs(cfg: ModelConfig, i: int, experts: bool = True) -> dict[str, tuple[int, ...]]:
    """One decoder layer's tensors; `experts=False` leaves out the routed experts."""
    h, p = cfg.hidden_size, f"model.layers.{i}"
    specs = {f"{p}.input_layernorm.weight": (h,)}
    specs.update(attention_specs(cfg, i))
    if cfg.is_moe_layer(i):
        specs[f"{p}.mlp.gate.weight"] = (cfg.n_routed_experts, h)
        if experts:
            for j in range(cfg.n_routed_experts):
                specs.update(mlp_specs(f"{p}.mlp.experts.{j}", h, cfg.moe_intermediate_size))
        specs.update(mlp_specs(f"{p}.mlp.shared_experts", h, cfg.moe_intermediate_size * cfg.n_shared_experts))
    else:
        specs.update(mlp_specs(f"{p}.mlp", h, cfg.intermediate_size))
    specs[f"{p}.post_attention_layernorm.weight"] = (h,)
    return specs


def model_specs(cfg: ModelConfig, experts: bool = True) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint in file order: embeddings, layers, final norm, lm_head."""
    specs = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for i in range(cfg.num_hidden_layers):
        specs.update(layer_specs(cfg, i, experts))
    specs["model.norm.weight"] = (cfg.hidden_size,)
    specs["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return specs


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def non_expert_numel(cfg: ModelConfig) -> int:
    return sum(numel(s) for s in model_specs(cfg, experts=False).values())


def device_weight_numel(cfg: ModelConfig) -> int:
    """The non-expert weights on the compute device: all but the token-embedding table (kept on the host,
    embedding.py)."""
    return non_expert_numel(cfg) - cfg.vocab_size * cfg.hidden_size

"""Configuration dataclasses: the model (from a Hugging Face config.json) and one run."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A config.json that this engine cannot run, with the reason."""


_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rms_norm_eps", "max_position_embeddings",
)


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a DeepSeek-V2 config.json (original format) that define the computation."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    q_lora_rank: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = False
    topk_method: str = "greedy"
    n_group: int = 1
    topk_group: int = 1
    scoring_func: str = "softmax"
    hidden_act: str = "silu"
    bos_token_id: int = 100000
    eos_token_id: int = 100001
    torch_dtype: str = "bfloat16"

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if d.get("model_type") != "deepseek_v2":
            raise ConfigError(f"unknown model_type {d.get('model_type')!r}: this engine runs 'deepseek_v2' checkpoints")
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ConfigError(f"config.json lacks required field(s): {', '.join(missing)}")
        names = set(cls.__dataclass_fields__)
        cfg = cls(**{k: v for k, v in d.items() if k in names})
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(d)

    def validate(self) -> None:
        if self.scoring_func != "softmax":
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported (only 'softmax')")
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"topk_method {self.topk_method!r} is not supported")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError("num_experts_per_tok exceeds n_routed_experts")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be a multiple of num_attention_heads")
        rs = self.rope_scaling
        if rs is not None and rs.get("type", rs.get("rope_type")) not in ("yarn", "default", None):
            raise ConfigError(f"rope_scaling type {rs.get('type')!r} is not supported (only yarn)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale squared (mscale_all_dim), as the original code does."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling or {}
        factor, m_all = rs.get("factor", 1.0), rs.get("mscale_all_dim", 0)
        if m_all and factor > 1:
            m = 0.1 * m_all * math.log(factor) + 1.0
            scale *= m * m
        return scale

    @property
    def expert_numel(self) -> int:
        """Elements of one routed expert: gate, up and down projections."""
        return 3 * self.moe_intermediate_size * self.hidden_size


@dataclass
class RunConfig:
    """How one engine instance runs: where, in what precision, with which expert runtime."""
    device: str = "cpu"
    dtype: str = "bfloat16"
    mode: str = "gpu"                     # gpu | fetch | cpu | hybrid
    gpu_memory: int | None = None         # bytes for everything on the compute device; None = no budget
    cache_policy: str = "lfu"             # lfu | lru | static
    prefetch: str = "none"                # none | gate | mlp
    predictor_path: str | None = None     # trained predictors for prefetch mlp (default: by checkpoint)
    lookahead: bool = True                # with prefetch: on-demand copies pay for the prefetch they displace
    max_batch_size: int = 1
    max_seq_len: int = 4096               # KV cache capacity per sequence (prompt + new tokens)
    prefill_chunk_tokens: int = 4096      # tokens per prefill forward (bounds activation memory)
    cache_slots: int | None = None        # cap on GPU expert-cache slots (None: all the budget allows)
    cpu_threads: int | None = None        # CPU expert threads; None = all cores but the copy-issuing one
    cpu_kernel: str = "auto"              # CPU experts: native (built kernel) | torch | auto (native if it builds)
    cpu_pool: bool = True                 # native kernel on its own thread pool, started before the GPU work is queued
    cpu_tiles: str = "auto"               # native kernel's AMX tile path for prefill-sized experts: auto | off
    copy_ahead: bool = True               # prefill: copy some of the next layer's experts behind this layer's copies
    costs_path: str | None = None         # calibration JSON; None = the default location
    static_decode: bool = True            # decode from static buffers over the whole cache (graph-ready)
    cuda_graphs: bool = True              # on CUDA, replay static decode steps from captured graphs
    prefill_graph_tokens: int = 512       # whole-prompt prefills of <= this many tokens (batch x length) whose shape
                                          # was seen before run from static buffers (graphs on CUDA); 0: never

"""Configuration dataclasses: the model (from a Hugging Face config.json) and one run."""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path


def cache_dir() -> Path:
    """Where the project keeps what it makes per machine (synthetic checkpoints, kernels, calibration,
    predictors): $HYBRID_CACHE, else ~/.cache/hybrid-moe. The one place the environment is read for it."""
    return Path(os.environ.get("HYBRID_CACHE") or Path.home() / ".cache" / "hybrid-moe")


class ConfigError(ValueError):
    """A config.json that this engine cannot run, with the reason."""


_NULLABLE = ("q_lora_rank", "rope_scaling")
_KINDS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "dict": (dict,)}
_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string", "dict": "an object",
          "None": "null"}


def check_type(name: str, value, annotation: str) -> None:
    """Raise ConfigError unless `value` (from JSON) has the field's declared type, e.g. "int | None"."""
    kinds = annotation.split(" | ")
    if value is None and "None" in kinds:
        return
    ok = any(isinstance(value, _KINDS[k]) and (k == "bool" or not isinstance(value, bool))
             for k in kinds if k in _KINDS)
    if not ok:
        want = " or ".join(_NAMES[k] for k in kinds)
        raise ConfigError(f"config.json field {name} must be {want}, got {json.dumps(value)}")


_REQUIRED = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rms_norm_eps", "max_position_embeddings",
)


_POSITIVE = tuple(n for n in _REQUIRED if n != "rms_norm_eps") + ("moe_layer_freq", "n_group", "topk_group")


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
        fields = {k: v for k, v in d.items()              # an optional field set to null takes its default
                  if k in names and not (v is None and k not in _NULLABLE and k not in _REQUIRED)}
        for k, v in fields.items():
            check_type(k, v, cls.__dataclass_fields__[k].type)
        cfg = cls(**fields)
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
        """Value checks beyond the types: ranges and the relations between fields, each naming what is allowed."""
        for name in _POSITIVE:
            if getattr(self, name) < 1:
                raise ConfigError(f"config.json field {name} must be at least 1, got {getattr(self, name)}")
        if self.first_k_dense_replace < 0 or self.rms_norm_eps <= 0:
            raise ConfigError("config.json needs first_k_dense_replace >= 0 and rms_norm_eps > 0")
        if self.scoring_func != "softmax":
            raise ConfigError(f"scoring_func {self.scoring_func!r} is not supported (only 'softmax')")
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"topk_method {self.topk_method!r} is not supported (greedy, group_limited_greedy)")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts "
                              f"({self.n_routed_experts})")
        self._validate_groups()
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError("hidden_size must be a multiple of num_attention_heads")
        rs = self.rope_scaling
        if rs is not None and rs.get("type", rs.get("rope_type")) not in ("yarn", "default", None):
            raise ConfigError(f"rope_scaling type {rs.get('type')!r} is not supported (yarn or default)")

    def _validate_groups(self) -> None:
        E, G = self.n_routed_experts, self.n_group
        if E % G:
            raise ConfigError(f"n_group ({G}) must divide n_routed_experts ({E})")
        if not 1 <= self.topk_group <= G:
            raise ConfigError(f"topk_group must be between 1 and n_group ({G}), got {self.topk_group}")
        if self.topk_method == "group_limited_greedy" and self.topk_group * (E // G) < self.num_experts_per_tok:
            raise ConfigError(f"group_limited_greedy keeps {self.topk_group} of {G} groups ({self.topk_group * (E // G)}"
                              f" experts), fewer than num_experts_per_tok ({self.num_experts_per_tok})")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        """As DeepSeek-V2's own code: from first_k_dense_replace on, every moe_layer_freq-th layer (the others
        dense). transformers ignores moe_layer_freq."""
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


MODES = ("auto", "gpu", "fetch", "cpu", "hybrid")
EXPERT_FORMATS = ("bf16", "q8", "q5", "q4", "q4k")   # routed experts: unquantized (compute dtype), 8-, 5-, 4-bit (quant.py)
CHOICES = {"dtype": ("bfloat16", "float16", "float32"), "mode": MODES, "experts": ("auto",) + EXPERT_FORMATS,
           "cache_policy": ("lfu", "lru", "static"), "cache_layout": ("auto", "layers", "spread"),
           "prefetch": ("auto", "none", "gate", "mlp"), "cpu_kernel": ("auto", "native", "torch"),
           "cpu_tiles": ("auto", "off", "emulate"), "cpu_dot": ("auto", "off", "emulate")}
AT_LEAST = {"max_batch_size": 1, "max_seq_len": 1, "prefill_chunk_tokens": 1, "cache_slots": 0, "cpu_threads": 1,
            "gpu_memory": 1, "prefill_graph_tokens": 0, "cpu_pool_spin_us": 0, "prefill_scratch": 0}


@dataclass
class RunConfig:
    """How one engine instance runs: where, in what precision, with which expert runtime. Checked on creation:
    a bad value raises ConfigError naming the field and what is allowed."""
    device: str = "cpu"                   # cpu | cuda | cuda:N
    dtype: str = "bfloat16"
    mode: str = "gpu"                     # auto | gpu | fetch | cpu | hybrid (auto: gpu if it fits, else hybrid)
    experts: str = "auto"                 # routed experts' format: bf16 (as loaded) | q8 | q4 | q4k (quantized once
                                          # or moved from a GGUF's blocks) | auto (a GGUF's own, else bf16)
    gpu_memory: int | None = None         # bytes for everything on the compute device; None = no budget
    cache_policy: str = "lfu"             # lfu | lru | static
    cache_layout: str = "auto"            # layers (the last MoE layers whole, run without the host) | spread
                                          # (an equal share per layer) | auto: layers at batch 1, else spread
                                          # (offload/expert_cache.py)
    prefetch: str = "auto"                # none | gate | mlp | auto: gate in mode hybrid at batch 1, else none
    predictor_path: str | None = None     # trained predictors for prefetch mlp (default: by checkpoint)
    lookahead: bool = True                # with prefetch: on-demand copies pay for the prefetch they displace
    max_batch_size: int = 1
    max_seq_len: int = 4096               # KV cache capacity per sequence (prompt + new tokens)
    prefill_chunk_tokens: int | None = None   # tokens per prefill forward (bounds activation memory); None: the
                                          # largest of 4096/2048/1024/512 whose activations take <= 1/16 of gpu_memory
    cache_slots: int | None = None        # cap on GPU expert-cache slots (None: all the budget allows)
    cpu_threads: int | None = None        # CPU expert threads; None = all cores but the copy-issuing one
    cpu_kernel: str = "auto"              # CPU experts: native (built kernel) | torch | auto (native if it builds)
    cpu_pool: bool = True                 # native kernel on its own thread pool, started before the GPU work is queued
    cpu_tiles: str = "auto"               # native kernel's AMX tile path for prefill-sized experts: auto | off
    cpu_dot: str = "auto"                 # native kernel's bf16 dot-product path (AVX512-BF16) for bf16 and 4-bit
                                          # experts at decode sizes: auto | off | emulate (plain C++, for tests)
    cpu_pool_spin_us: int = 2000          # GPU machines: idle pool members spin this long before they sleep
    cpu_prefetch: bool = True             # native kernel: software prefetch of the next weight rows into L2 (tile
                                          # path; quantized vector path)
    copy_ahead: bool = True               # prefill: copy some of the next layer's experts behind this layer's copies
    costs_path: str | None = None         # calibration JSON; None = the default location
    static_decode: bool = True            # decode from static buffers over the whole cache (graph-ready)
    cuda_graphs: bool = True              # on CUDA, replay static decode steps from captured graphs
    prefill_scratch: int | None = None    # quantized experts offloaded: experts prefill dequantizes at once into a
                                          # bf16 scratch (0: none; None: up to 8, at most 1/4 of the cache's room)
    file_blocks: bool = False             # mode gpu: a GGUF's non-expert weights stay in its blocks (set where their
                                          # copies in the compute dtype would not fit gpu_memory; offloading always)
    prefill_graph_tokens: int | None = None   # whole-prompt prefills of <= this many tokens (batch x length) whose
                                          # shape was seen before run from static buffers (graphs on CUDA); 0: never;
                                          # None: the largest of 512/256/128 whose graphs take <= 1/24 of gpu_memory

    @property
    def weights_in_blocks(self) -> bool:
        """Whether a GGUF's non-expert weights stay in its blocks (of a concrete mode): offloading, or file_blocks."""
        return self.mode != "gpu" or self.file_blocks

    def __post_init__(self) -> None:
        if not re.fullmatch(r"cpu|cuda(:\d+)?", str(self.device)):
            raise ConfigError(f"device {self.device!r} is not supported: cpu, cuda or cuda:N")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name, low in AT_LEAST.items():
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise ConfigError(f"{name} must be an integer of at least {low}, got {value!r}")

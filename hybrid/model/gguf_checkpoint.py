"""A llama.cpp GGUF file (architecture deepseek2) read as a checkpoint: the config from its metadata, tensors by
their Hugging Face names, dequantized on read (gguf's dequantizer: every type llama.cpp writes), memory-mapped.

Names: `blk.N.attn_q` is `model.layers.N.self_attn.q_proj`, and so on (NAMES); the routed experts of a layer are one
tensor `blk.N.ffn_{gate,up,down}_exps` [experts, rows, cols], expert e read as a slab. Attention's kv_b appears as
`attn_kv_b` in older files and as `attn_k_b` [H, kv_lora, nope] + `attn_v_b` [H, v, kv_lora] in newer ones; both
give kv_b_proj [H * (nope + v), kv_lora]. The config's YaRN `mscale` is not in the metadata: taken equal to
`mscale_all_dim` (as in DeepSeek-V2 and V2-Lite).

The routed experts' blocks move into quant.py's planes without requantizing (`layer_planes`, ggml_blocks.py): Q8_0
into q8, Q5_0 into q5, Q4_0 into q4, Q4_K into q4k; `native_format` names the format a file's expert types fit
(Q5_0: q5; Q4_K_M: q4k, whose Q5_0 downs each layer keeps as q5: `layer_layout`), which `--experts auto` takes;
other expert types run dequantized (bf16). A layer's shared experts move the same way into one FFN's planes where
their types fit a plane kind (`ffn_layout`: Q4_K_M's Q4_K gate/up and Q4_K, Q6_K, Q5_0 or Q8_0 down; Q6_K into q6k,
a kind for matrices outside the routed experts), and so does the dense first layer's MLP, and attention's q, kv_a
and output projections and the output head, one matrix each (`linear_layout`); the rest (kv_b, absorbed into the
attention; norms; other block types) is dequantized. The engine keeps blocks only while offloading. The tokenizer
and chat template in the metadata are read by engine/gguf_tokenizer.py."""
from __future__ import annotations

import hashlib
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from .checkpoint import Checkpoint, CheckpointError
from .config import ModelConfig
from . import ggml_blocks
from .quant import GROUP, MATRICES, SUPER, ExpertLayout, Matrix, ffn_layout, plane_bytes

CARRIED = {"q5": {"Q5_0"}, "q8": {"Q8_0", "Q5_0"}, "q4": {"Q4_0"},   # block types that move into each plane kind,
           "q4k": {"Q4_K"}, "q6k": {"Q6_K"}}                       # first fit first (q6k: outside the routed experts)

NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
         "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
         "attn_kv_b": "self_attn.kv_b_proj", "attn_output": "self_attn.o_proj", "ffn_gate_inp": "mlp.gate",
         "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
         "ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
         "ffn_down_shexp": "mlp.shared_experts.down_proj"}
GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
          "output.weight": "lm_head.weight"}
EXPERTS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
EXPERT_FFN = tuple(EXPERTS)                                   # gate, up, down: a layer's routed experts
FFNS = {"shared": ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"),   # a MoE layer's shared experts, one FFN
        "dense": ("ffn_gate", "ffn_up", "ffn_down")}                        # a dense layer's MLP
KV_B = "attn_kv_b.weight"                         # absent in newer files: attn_k_b + attn_v_b instead


def field(reader, key: str, default=None):
    """A metadata value of a GGUFReader, or `default` where the key is absent."""
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def config_from_metadata(reader) -> dict:
    """The Hugging Face config.json fields of a deepseek2 GGUF."""
    arch = field(reader, "general.architecture")
    if arch != "deepseek2":
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported: only deepseek2 (DeepSeek-V2 / V2-Lite)")
    g = lambda key, default=None: field(reader, f"deepseek2.{key}", default)  # noqa: E731
    rope = g("rope.dimension_count")
    mult = g("rope.scaling.yarn_log_multiplier", 0.0)
    scaling = None
    if g("rope.scaling.type") == "yarn":
        scaling = {"type": "yarn", "factor": g("rope.scaling.factor"), "beta_fast": g("rope.scaling.yarn_beta_fast"),
                   "beta_slow": g("rope.scaling.yarn_beta_slow"), "mscale": mult / 0.1, "mscale_all_dim": mult / 0.1,
                   "original_max_position_embeddings": g("rope.scaling.original_context_length")}
    groups = g("expert_group_count", 1)
    return {"model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"],
            "hidden_size": g("embedding_length"), "intermediate_size": g("feed_forward_length"),
            "moe_intermediate_size": g("expert_feed_forward_length"), "num_hidden_layers": g("block_count"),
            "num_attention_heads": g("attention.head_count"), "num_key_value_heads": g("attention.head_count"),
            "n_routed_experts": g("expert_count"), "num_experts_per_tok": g("expert_used_count"),
            "n_shared_experts": g("expert_shared_count"), "first_k_dense_replace": g("leading_dense_block_count"),
            "kv_lora_rank": g("attention.kv_lora_rank"), "q_lora_rank": g("attention.q_lora_rank"),
            "qk_rope_head_dim": rope, "qk_nope_head_dim": g("attention.key_length_mla", g("attention.key_length")) - rope,
            "v_head_dim": g("attention.value_length_mla", g("attention.value_length")),
            "rope_theta": g("rope.freq_base"), "rope_scaling": scaling, "rms_norm_eps": g("attention.layer_norm_rms_epsilon"),
            "max_position_embeddings": g("context_length"), "vocab_size": g("vocab_size"),
            "routed_scaling_factor": g("expert_weights_scale", 1.0), "norm_topk_prob": bool(g("expert_weights_norm", False)),
            "n_group": groups, "topk_group": g("expert_group_used_count", 1), "scoring_func": "softmax",
            "topk_method": "greedy" if groups == 1 else "group_limited_greedy", "moe_layer_freq": 1,
            "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": "output.weight" not in
            {t.name for t in reader.tensors},
            "bos_token_id": field(reader, "tokenizer.ggml.bos_token_id", 100000),
            "eos_token_id": field(reader, "tokenizer.ggml.eos_token_id", 100001)}


def read_gguf(path: str | Path):
    """The file's GGUFReader, memory-mapped and parsed once per process while the file is unchanged (the tokenizer
    and the checkpoint share it)."""
    p = Path(path).resolve()
    st = p.stat()
    return _reader(str(p), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=4)
def _reader(path: str, mtime_ns: int, size: int):
    from gguf import GGUFReader
    return GGUFReader(path)


class GgufCheckpoint:
    """The Checkpoint interface (config, get, expert_names, identity, check_shapes) over one GGUF file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"GGUF file {self.path} does not exist")
        try:
            self.reader = read_gguf(self.path)
        except (ValueError, OSError) as e:
            raise CheckpointError(f"{self.path.name} is not a readable GGUF file: {e}") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.config = ModelConfig.from_dict(config_from_metadata(self.reader))

    def _source(self, name: str) -> tuple[str | None, int | None]:
        """The GGUF tensor behind a Hugging Face name and the expert's slab in it (None: the whole tensor);
        (None, None) where a deepseek2 GGUF has no such tensor."""
        glob = {v: k for k, v in GLOBAL.items()}
        if name in glob:
            return glob[name], None
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
        if m is None:
            return None, None
        e = re.fullmatch(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)", m[2])
        if e is not None:
            return f"blk.{m[1]}.{next(k for k, v in EXPERTS.items() if v == e[2])}.weight", int(e[1])
        kind = next((k for k, v in NAMES.items() if v == m[2]), None)
        return (None, None) if kind is None else (f"blk.{m[1]}.{kind}.weight", None)

    def _array(self, name: str, expert: int | None = None) -> np.ndarray:
        """A GGUF tensor (or one expert's slab of it), dequantized to float32."""
        from gguf.quants import dequantize
        if name not in self.tensors:
            raise CheckpointError(f"tensor {name} is not in {self.path.name}")
        t = self.tensors[name]
        try:
            return dequantize(t.data if expert is None else t.data[expert], t.tensor_type)
        except NotImplementedError:
            raise CheckpointError(f"tensor {name} has type {t.tensor_type.name}, which gguf cannot dequantize") \
                from None

    def _split_kv_b(self, name: str) -> bool:
        return name.endswith(KV_B) and name not in self.tensors

    def get(self, name: str) -> torch.Tensor:
        """One tensor by its Hugging Face name, dequantized to float32."""
        src, expert = self._source(name)
        if src is None:
            raise CheckpointError(f"tensor {name} has no counterpart in a deepseek2 GGUF")
        if self._split_kv_b(src):
            p = src[:-len(KV_B)]
            k, v = self._array(f"{p}attn_k_b.weight"), self._array(f"{p}attn_v_b.weight")   # [H, C, n], [H, v, C]
            return torch.from_numpy(np.concatenate([k.transpose(0, 2, 1), v], axis=1).reshape(-1, k.shape[1]))
        return torch.from_numpy(self._array(src, expert).copy())

    def layer_planes(self, layer: int, lay: ExpertLayout) -> torch.Tensor:
        """A layer's experts in lay's planes, moved from the file's blocks without requantizing -> [E, lay.nbytes]."""
        return self._planes(layer, EXPERT_FFN, lay)

    def layer_layout(self, layer: int, lay: ExpertLayout) -> ExpertLayout:
        """The layout this layer's experts move into at their own size: lay, but with a q5 down where lay is q4k (a
        q8 down) and the layer's down blocks are all Q5_0 (Q4_K_M's downs are Q5_0 in some layers, Q8_0 in others;
        the kernels take q4k gate/up with either)."""
        t = self.tensors.get(f"blk.{layer}.ffn_down_exps.weight")
        if t is None or (lay.w13.kind, lay.w2.kind) != ("q4k", "q8") or t.tensor_type.name not in CARRIED["q5"]:
            return lay
        return ffn_layout(lay.w2.cols, lay.w2.rows, (lay.w13.kind, "q5"), lay.fmt)

    def ffn_layout(self, layer: int, which: str) -> ExpertLayout | None:
        """The planes a layer's shared experts (`which` "shared": one FFN of width n_shared x I) or dense MLP
        ("dense") move into unchanged, or None where a block type has no plane kind (F32, F16, Q5_K, ...: they are
        dequantized with the other tensors)."""
        t = [self.tensors.get(f"blk.{layer}.{k}.weight") for k in FFNS[which]]
        if None in t:
            return None
        kind = lambda *ts: next((k for k, c in CARRIED.items() if {x.tensor_type.name for x in ts} <= c), None)  # noqa: E731
        k13, k2 = kind(t[0], t[1]), kind(t[2])
        if k13 is None or k2 is None:
            return None
        return ffn_layout(int(t[0].shape[1]), int(t[0].shape[0]), (k13, k2), which)

    def ffn_planes(self, layer: int, which: str, lay: ExpertLayout) -> torch.Tensor:
        """A layer's shared experts or dense MLP in lay's planes (ffn_layout) -> [lay.nbytes]."""
        return self._planes(layer, FFNS[which], lay)[0]

    def linear_layout(self, name: str) -> Matrix | None:
        """The plane kind a matrix outside the experts (Hugging Face name: attention's projections, the output
        head) moves into unchanged, as one Matrix at offset 0; None where its type has no plane kind (F32, F16,
        Q5_K, ...), its rows fit no whole block of that kind, it has not a multiple of 16 rows, or the file has no
        such tensor."""
        src, expert = self._source(name)
        t = self.tensors.get(src) if src is not None and expert is None else None
        kind = None if t is None else next((k for k, c in CARRIED.items() if t.tensor_type.name in c), None)
        if kind is None or len(t.shape) != 2:
            return None
        cols, rows = (int(n) for n in t.shape)                    # GGUF lists a matrix's shape columns first
        fits = cols % (SUPER if kind in ("q4k", "q6k") else GROUP) == 0 and rows % 16 == 0  # (16: the kernel's tile)
        return Matrix(rows, cols, kind, 0) if fits else None

    def linear_planes(self, name: str, mat: Matrix) -> torch.Tensor:
        """The matrix's blocks in mat's planes (linear_layout) -> [mat.nbytes] uint8."""
        t = self.tensors[self._source(name)[0]]
        raw = np.asarray(t.data).reshape(mat.rows, -1)
        return plane_bytes(ggml_blocks.planes(raw, t.tensor_type.name, mat.kind))

    def _planes(self, layer: int, names: tuple[str, str, str], lay: ExpertLayout) -> torch.Tensor:
        """gate, up, down blocks of a layer (one tensor each: [E, R, cols] for the routed experts, [R, cols] for
        the shared ones) -> [E, lay.nbytes] (E = 1 for the shared ones)."""
        parts = []
        for kinds, mat in ((names[:2], lay.w13), (names[2:], lay.w2)):
            per = []
            for k in kinds:
                raw, block = self._expert_blocks(f"blk.{layer}.{k}.weight", mat.kind, lay.fmt)  # [E, R, row bytes]
                raw = raw if raw.ndim == 3 else raw[None]
                E, R = raw.shape[:2]
                moved = ggml_blocks.planes(raw.reshape(E * R, -1), block, mat.kind)
                per.append([p.reshape(E, R, -1) for p in moved])
            joined = [np.concatenate(p, axis=1) for p in zip(*per)]                  # gate's rows, then up's
            parts += [np.ascontiguousarray(p).reshape(p.shape[0], -1).view(np.uint8) for p in joined]
        return torch.from_numpy(np.concatenate(parts, axis=1))

    def _expert_blocks(self, name: str, kind: str, fmt: str) -> tuple[np.ndarray, str]:
        """(the experts' rows of raw blocks [E, R, row bytes], their type), checked to move into `kind`'s planes."""
        t = self.tensors.get(name)
        if t is None:
            raise CheckpointError(f"tensor {name} is not in {self.path.name}")
        if t.tensor_type.name not in CARRIED[kind]:
            raise CheckpointError(f"--experts {fmt} carries {' or '.join(sorted(CARRIED[kind]))} blocks into "
                                  f"{name}, but {self.path.name} has {t.tensor_type.name}: use --experts auto "
                                  f"(for this file {self.native_format()}) or bf16 (dequantized)")
        return np.asarray(t.data), t.tensor_type.name

    def native_format(self) -> str:
        """The expert format whose planes this file's expert blocks move into unchanged (bf16: none fits, the
        experts are dequantized)."""
        def types(kinds: tuple[str, ...]) -> set[str]:
            return {self.tensors[n].tensor_type.name for L in self.config.moe_layers for k in kinds
                    if (n := f"blk.{L}.{k}.weight") in self.tensors}
        w13, w2 = types(("ffn_gate_exps", "ffn_up_exps")), types(("ffn_down_exps",))
        if not w13 or not w2:
            return "bf16"
        for fmt, (k13, k2) in MATRICES.items():
            if w13 <= CARRIED[k13] and w2 <= CARRIED[k2]:
                return fmt
        return "bf16"

    def _shape(self, name: str) -> tuple[int, ...] | None:
        """A tensor's shape by its Hugging Face name, from the file's tensor table (nothing dequantized)."""
        def dims(g: str) -> tuple[int, ...] | None:
            t = self.tensors.get(g)
            return None if t is None else tuple(int(n) for n in reversed(t.shape))
        src, expert = self._source(name)
        if src is None:
            return None
        if self._split_kv_b(src):
            p = src[:-len(KV_B)]
            k, v = dims(f"{p}attn_k_b.weight"), dims(f"{p}attn_v_b.weight")          # [H, C, n], [H, v, C]
            return None if k is None or v is None else (k[0] * (k[2] + v[1]), k[1])
        d = dims(src)
        return d if d is None or expert is None else d[1:]

    def check_shapes(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Fail with the first tensor that is missing or whose shape differs from what the metadata implies."""
        for name, shape in expected.items():
            got = self._shape(name)
            if got is None:
                raise CheckpointError(f"tensor {name} is missing from {self.path.name}")
            if got != tuple(shape):
                raise CheckpointError(f"tensor {name} has shape {list(got)} in {self.path.name}, expected "
                                      f"{list(shape)} from its metadata")

    def identity(self) -> str:
        """16 hex digits naming the weights: the metadata's config and the first router's values."""
        h = hashlib.sha1(repr(sorted(config_from_metadata(self.reader).items())).encode())
        h.update(self.get(f"model.layers.{self.config.moe_layers[0]}.mlp.gate.weight").numpy().tobytes())
        return h.hexdigest()[:16]

    expert_names = Checkpoint.expert_names           # experts go by their Hugging Face names here too


def open_checkpoint(path: str | Path):
    """A checkpoint directory (Hugging Face layout) or a .gguf file."""
    return GgufCheckpoint(path) if str(path).endswith(".gguf") else Checkpoint(path)

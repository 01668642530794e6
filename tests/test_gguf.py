"""GGUF files (llama.cpp's deepseek2) read as checkpoints: written here with gguf's writer (F32, and Q8_0 / Q4_0
through its quantizer) and, where ../shared has llama.cpp's source, by llama.cpp's own converter."""
import re
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file

from conftest import PROMPTS, ROOT, budget_for, make, rel_err
from hybrid.engine.engine import Engine
from hybrid.engine.sampling import SamplingParams
from hybrid.engine.tokenizer import TokenizerError, load_tokenizer
from hybrid.kernels.quant_gpu import QuantizedFFN
from hybrid.model.checkpoint import Checkpoint, CheckpointError
from hybrid.model.config import RunConfig
from hybrid.model.ggml_blocks import encode_q4_k, encode_q5_0, encode_q6_k
from hybrid.model.gguf_checkpoint import EXPERTS, GLOBAL, NAMES, GgufCheckpoint

ENCODE = {Q.Q4_K: encode_q4_k, Q.Q5_0: encode_q5_0, Q.Q6_K: encode_q6_k, Q.Q8_0: lambda m: quantize(m, Q.Q8_0)}
PEER = ROOT.parent / "shared" / "peers" / "llamacpp"
RUN = dict(dtype="float32", max_batch_size=3, max_seq_len=128)


def metadata(w: GGUFWriter, c) -> None:
    """The deepseek2 keys llama.cpp's converter writes (newer files: MLA key/value lengths)."""
    u, f = w.add_uint32, w.add_float32
    for key, value in (("block_count", c.num_hidden_layers), ("context_length", c.max_position_embeddings),
                       ("embedding_length", c.hidden_size), ("feed_forward_length", c.intermediate_size),
                       ("attention.head_count", c.num_attention_heads), ("attention.head_count_kv", 1),
                       ("expert_count", c.n_routed_experts), ("expert_used_count", c.num_experts_per_tok),
                       ("expert_shared_count", c.n_shared_experts), ("leading_dense_block_count", c.first_k_dense_replace),
                       ("expert_feed_forward_length", c.moe_intermediate_size), ("vocab_size", c.vocab_size),
                       ("attention.kv_lora_rank", c.kv_lora_rank), ("rope.dimension_count", c.qk_rope_head_dim),
                       ("attention.key_length", c.kv_lora_rank + c.qk_rope_head_dim),
                       ("attention.value_length", c.kv_lora_rank),
                       ("attention.key_length_mla", c.qk_nope_head_dim + c.qk_rope_head_dim),
                       ("attention.value_length_mla", c.v_head_dim), ("expert_gating_func", 1)):
        u(f"deepseek2.{key}", value)
    rs = c.rope_scaling
    w.add_string("deepseek2.rope.scaling.type", "yarn")
    for key, value in (("rope.freq_base", c.rope_theta), ("attention.layer_norm_rms_epsilon", c.rms_norm_eps),
                       ("expert_weights_scale", c.routed_scaling_factor), ("rope.scaling.factor", rs["factor"]),
                       ("rope.scaling.yarn_beta_fast", rs["beta_fast"]), ("rope.scaling.yarn_beta_slow", rs["beta_slow"]),
                       ("rope.scaling.yarn_log_multiplier", 0.1 * rs["mscale_all_dim"])):
        f(f"deepseek2.{key}", value)
    u("deepseek2.rope.scaling.original_context_length", rs["original_max_position_embeddings"])


def gguf_tensors(ckpt: Checkpoint, split_kv_b: bool):
    """(GGUF name, float32 array) in llama.cpp's layout."""
    c = ckpt.config
    for g, hf in GLOBAL.items():
        yield g, ckpt.get(hf).float().numpy()
    for L in range(c.num_hidden_layers):
        for g, hf in NAMES.items():
            name = f"model.layers.{L}.{hf}.weight"
            if name not in ckpt:
                continue
            w = ckpt.get(name).float().numpy()
            if g == "attn_kv_b" and split_kv_b:
                H, n = c.num_attention_heads, c.qk_nope_head_dim
                per = w.reshape(H, n + c.v_head_dim, -1)
                yield f"blk.{L}.attn_k_b.weight", np.ascontiguousarray(per[:, :n].transpose(0, 2, 1))
                yield f"blk.{L}.attn_v_b.weight", np.ascontiguousarray(per[:, n:])
                continue
            yield f"blk.{L}.{g}.weight", w
        if L in c.moe_layers:
            for g, hf in EXPERTS.items():
                yield f"blk.{L}.{g}.weight", np.stack([ckpt.get(f"model.layers.{L}.mlp.experts.{e}.{hf}.weight")
                                                       .float().numpy() for e in range(c.n_routed_experts)])


LINEARS = {"attn_q": "self_attn.q_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
           "attn_output": "self_attn.o_proj"}                 # the matrices `linear` types (and the output head)


def write_gguf(tiny, path, qtype=Q.F32, split_kv_b=True, drop=(), experts=None, linear=None):
    """The tiny checkpoint as a GGUF; 2-D and expert matrices in `qtype` (norms stay F32); tensors in `drop` left out;
    experts(name) -> a block type for a routed or shared expert's or the dense MLP's tensor, linear(name) -> one for
    attention's q, kv_a and output projections and the output head, written by ggml_blocks' encoders."""
    ckpt = Checkpoint(tiny)
    w = GGUFWriter(str(path), "deepseek2")
    metadata(w, ckpt.config)
    for name, a in gguf_tensors(ckpt, split_kv_b):
        if name in drop:
            continue
        if experts is not None and "_exps" in name:
            t = experts(name)
            w.add_tensor(name, np.stack([ENCODE[t](m) for m in a]), raw_dtype=t)
        elif experts is not None and re.fullmatch(r"blk\.\d+\.ffn_(gate|up|down)(_shexp)?\.weight", name):
            t = experts(name)
            w.add_tensor(name, ENCODE[t](a), raw_dtype=t)
        elif linear is not None and re.fullmatch(rf"blk\.\d+\.({'|'.join(LINEARS)})\.weight|output\.weight", name):
            t = linear(name)
            w.add_tensor(name, ENCODE[t](a), raw_dtype=t)
        elif qtype != Q.F32 and a.ndim >= 2 and a.shape[-1] % 32 == 0:
            w.add_tensor(name, quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("split_kv_b", [True, False])
def test_f32_gguf_computes_the_checkpoints_function(tiny, tmp_path, split_kv_b):
    path = write_gguf(tiny, tmp_path / "tiny.gguf", split_kv_b=split_kv_b)
    e, ref = Engine(str(path), RunConfig(**RUN), progress=False), make(tiny)
    assert rel_err(e.logits(PROMPTS[0]), ref.logits(PROMPTS[0])) <= 1e-6
    greedy = SamplingParams(max_new_tokens=8, stop_on_eos=False)
    assert e.generate(PROMPTS, greedy).tokens == ref.generate(PROMPTS, greedy).tokens


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0])
def test_quantized_gguf_equals_transformers_with_ggufs_dequantized_weights(tiny, tmp_path, qtype):
    path = write_gguf(tiny, tmp_path / "q.gguf", qtype, split_kv_b=False)   # kv_b's rows quantized as in the oracle
    oracle = dequantized_oracle(tiny, tmp_path, qtype)
    e = Engine(str(path), RunConfig(**RUN, experts="bf16"), progress=False)      # experts dequantized on read
    for p in PROMPTS:
        with torch.no_grad():
            assert rel_err(e.logits(p), oracle(torch.tensor([p])).logits[0]) <= 1e-4
    greedy = SamplingParams(max_new_tokens=8, stop_on_eos=False)
    for p, toks in zip(PROMPTS, e.generate(PROMPTS, greedy).tokens):
        with torch.no_grad():
            ref = oracle.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
        assert toks == ref[0, len(p):].tolist()


@pytest.mark.parametrize("qtype, fmt", [(Q.Q8_0, "q8"), (Q.Q4_0, "q4"), (Q.Q5_0, "q5")])
@pytest.mark.parametrize("mode", ["gpu", "fetch", "hybrid"])
def test_q8_0_q4_0_and_q5_0_experts_are_carried_without_requantizing(tiny, tmp_path, qtype, fmt, mode):
    path = write_gguf(tiny, tmp_path / "q.gguf", qtype, split_kv_b=False)
    oracle = dequantized_oracle(tiny, tmp_path, qtype)
    budget = None if mode == "gpu" else budget_for(tiny, 20, experts=fmt)
    e = Engine(str(path), RunConfig(**RUN, experts=fmt, mode=mode, gpu_memory=budget, prefill_scratch=0),
               progress=False)
    with torch.no_grad():
        assert rel_err(e.logits(PROMPTS[0]), oracle(torch.tensor([PROMPTS[0]])).logits[0]) <= 1e-4
    if mode != "gpu":
        assert e.backend.store.path == path                  # carried from the file, nothing written to the cache


def test_a_format_that_does_not_match_the_files_blocks_is_one_clear_error(tiny, tmp_path):
    path = write_gguf(tiny, tmp_path / "q8.gguf", Q.Q8_0, split_kv_b=False)
    with pytest.raises(CheckpointError, match="carries Q4_0 blocks into .*, but q8.gguf has Q8_0: use --experts auto "
                                              r"\(for this file q8\)"):
        Engine(str(path), RunConfig(**RUN, experts="q4"), progress=False)


def gguf_linear_name(name: str) -> str | None:
    """The GGUF name of a Hugging Face name `write_gguf`'s linear(name) types, else None."""
    if name == "lm_head.weight":
        return "output.weight"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.weight", name)
    g = m and next((g for g, hf in LINEARS.items() if hf == m[2]), None)
    return g and f"blk.{m[1]}.{g}.weight"


def dequantized_oracle(tiny, tmp_path, qtype=None, types=None, linear=None):
    """transformers on the tiny checkpoint with each 2-D tensor through gguf's quantizer (or, with types(name) ->
    a block type, each routed expert, the shared experts and the dense MLP through ggml_blocks' encoders, and with
    linear(name) attention's projections and the output head) and back through gguf's dequantizer."""
    from transformers import AutoModelForCausalLM
    deq = tmp_path / "deq"
    deq.mkdir()
    for f in tiny.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, deq / f.name)
            continue
        tensors = load_file(f)
        for name, t in tensors.items():
            a, m = t.float().numpy(), re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.\d+\.(\w+)\.weight", name)
            ffn = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.(shared_experts\.)?(\w+)_proj\.weight", name)
            if linear is not None and gguf_linear_name(name):
                kind = linear(gguf_linear_name(name))
                tensors[name] = torch.from_numpy(dequantize(ENCODE[kind](a), kind).copy())
            elif types is not None and (m is not None or ffn is not None):
                g = f"blk.{m[1]}.{next(k for k, v in EXPERTS.items() if v == m[2])}.weight" if m is not None else \
                    f"blk.{ffn[1]}.ffn_{ffn[3]}{'_shexp' if ffn[2] else ''}.weight"
                kind = types(g)
                tensors[name] = torch.from_numpy(dequantize(ENCODE[kind](a), kind).copy())
            elif qtype is not None and a.ndim == 2 and a.shape[-1] % 32 == 0:
                tensors[name] = torch.from_numpy(dequantize(quantize(a, qtype), qtype).copy())
        save_file(tensors, deq / f.name)
    return AutoModelForCausalLM.from_pretrained(str(deq), dtype=torch.float32).eval()


def assert_same_function(e: Engine, oracle) -> None:
    """The engine's logits (1e-4) and greedy tokens equal the transformers oracle's on two prompts."""
    prompts = [[1, 5, 900, 17, 33, 4, 8], [9, 8, 7]]
    for p in prompts:
        with torch.no_grad():
            assert rel_err(e.logits(p), oracle(torch.tensor([p])).logits[0]) <= 1e-4
    for p, toks in zip(prompts, e.generate(prompts, SamplingParams(max_new_tokens=8, stop_on_eos=False)).tokens):
        with torch.no_grad():
            ref = oracle.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, min_new_tokens=8)
        assert toks == ref[0, len(p):].tolist()


def q4_k_m(name: str):
    """Expert block types as llama-quantize's Q4_K_M gives V2-Lite: gate/up Q4_K, down Q5_0 or Q8_0 by layer
    (routed and shared experts and the dense MLP; the tiny downs' rows of 64 or 128 fit no Q4_K or Q6_K block
    either)."""
    if "down" not in name:
        return Q.Q4_K
    return Q.Q8_0 if int(name.split(".")[1]) % 2 else Q.Q5_0


@pytest.mark.parametrize("mode", ["gpu", "fetch", "hybrid"])
def test_q4_k_m_experts_move_into_q4k_planes_and_compute_the_files_function(wide, tmp_path, mode, monkeypatch):
    from hybrid.kernels import quant_gpu
    real = quant_gpu.grouped_qffn

    def rows_only(xs, *a, **k):              # the GPU's Triton kernel takes [N, Hd] (the dense MLP gets [B, T, Hd])
        assert xs.dim() == 2
        return real(xs, *a, **k)
    monkeypatch.setattr(quant_gpu, "grouped_qffn", rows_only)
    path = write_gguf(wide, tmp_path / "m.gguf", experts=q4_k_m)
    assert GgufCheckpoint(path).native_format() == "q4k"
    oracle = dequantized_oracle(wide, tmp_path, types=q4_k_m)
    budget = None if mode == "gpu" else budget_for(wide, 20, experts="q4k")
    e = Engine(str(path), RunConfig(**RUN, mode=mode, gpu_memory=budget, prefill_scratch=0), progress=False)
    assert e.run.experts == "q4k"
    quantized = [isinstance(m.shared, QuantizedFFN) for *_, m in e.model.layers[1:]]   # shared experts in blocks
    quantized.append(isinstance(e.model.layers[0][3], QuantizedFFN))                   # the dense MLP too
    assert all(quantized) if mode != "gpu" else not any(quantized)                    # (offloading only)
    assert_same_function(e, oracle)


def gguf_budget(ckpt: GgufCheckpoint, slots: int) -> int:
    """A --gpu-memory that leaves `slots` q4k slots for this file (its non-expert weights at their size; float32,
    batch 3 x 128 tokens, no margin)."""
    from hybrid.model.quant import layout
    from hybrid.offload.budget import plan_memory
    from hybrid.offload.runtime import device_weight_bytes, staging_slots
    cfg = ckpt.config
    plan = plan_memory(cfg, 1 << 40, 3, 128, 4, 4096, staging_slots(cfg), margin=0,
                       slot_bytes=layout(cfg, "q4k").nbytes, weights=device_weight_bytes(cfg, ckpt, 4))
    return plan.budget - (plan.n_slots - slots) * plan.slot_bytes


def test_only_q4k_layers_take_their_own_q5_downs(wide, tmp_path):
    """The kernels take q4k gate/up with a q5 or a q8 down: a q8 file whose downs mix Q5_0 and Q8_0 stays q8."""
    from hybrid.model.quant import layout
    m = GgufCheckpoint(write_gguf(wide, tmp_path / "m.gguf", experts=q4_k_m))
    q = GgufCheckpoint(write_gguf(wide, tmp_path / "q.gguf",
                                  experts=lambda n: q4_k_m(n) if "down" in n else Q.Q8_0))
    cfg, q4k = m.config, layout(m.config, "q4k")
    assert m.layer_layout(2, q4k).w2.kind == "q5" and m.layer_layout(1, q4k).w2.kind == "q8"
    assert q.native_format() == "q8" and q.layer_layout(2, layout(cfg, "q8")) == layout(cfg, "q8")


@pytest.mark.parametrize("mode", ["fetch", "hybrid"])
def test_planned_layers_read_their_own_q5_downs_from_the_common_slots(wide, tmp_path, mode):
    """Equal shares of 12 slots: a Q5_0 layer's fetched experts move at their own size into the common slots and
    run there (and on the CPU lane) in their own layout, beside Q8_0 layers', computing the file's function."""
    from hybrid.model.quant import layout
    path = write_gguf(wide, tmp_path / "m.gguf", experts=q4_k_m)
    e = Engine(str(path), RunConfig(**RUN, mode=mode, cache_layout="spread", prefill_scratch=0,
                                    gpu_memory=gguf_budget(GgufCheckpoint(path), 12)), progress=False)
    assert e.backend.store.layout(2).w2.kind == "q5" and e.backend.store.layout(1).w2.kind == "q8"
    prompt = [(37 * i) % 1000 + 3 for i in range(40)]
    x = e.generate([prompt], SamplingParams(max_new_tokens=8, stop_on_eos=False)).stats.experts
    assert x.misses > 0
    if mode == "fetch":
        assert 0 < x.fetched_bytes < x.fetched * layout(e.cfg, "q4k").nbytes
    else:
        assert x.cpu_experts > 0
    assert_same_function(e, dequantized_oracle(wide, tmp_path, types=q4_k_m))


def test_whole_layers_hold_their_own_q5_downs_and_more_of_them_fit(wide, tmp_path):
    """Under whole layers, a Q4_K_M file's layers with Q5_0 downs are held at their own size (q5 downs, not widened
    to q8), smallest first: a budget of 30 widened slots holds two whole layers (one of them with q5 downs) where
    widened it held one, and the engine still computes the file's function."""
    from hybrid.model.quant import layout
    path = write_gguf(wide, tmp_path / "m.gguf", experts=q4_k_m)
    oracle = dequantized_oracle(wide, tmp_path, types=q4_k_m)
    run = RunConfig(**RUN, mode="hybrid", cache_layout="layers", prefill_scratch=0,
                    gpu_memory=gguf_budget(GgufCheckpoint(path), 30))                  # 30 widened slots
    e = Engine(str(path), run, progress=False)
    cache, wide_lay = e.backend.cache, layout(e.cfg, "q4k")
    downs = {L: cache.whole[L].w2.kind for L in cache.whole}
    assert e.backend.pinned.layers == set(cache.whole) == {2, 3} and downs == {2: "q5", 3: "q8"}
    assert cache.whole[2].nbytes < wide_lay.nbytes == cache.whole[3].nbytes
    assert 16 * (cache.whole[2].nbytes + wide_lay.nbytes) <= 30 * wide_lay.nbytes < 32 * wide_lay.nbytes
    assert_same_function(e, oracle)
    assert e.generate([[1, 5, 900]], SamplingParams(max_new_tokens=4, stop_on_eos=False)).stats.experts.misses > 0
    resident = Engine(str(path), RunConfig(**RUN, mode="gpu"), progress=False)       # all resident: the same sizes
    assert [resident.backend.ffn[L].keywords["slots"].shape[1] for L in (1, 2, 3)] == \
        [wide_lay.nbytes, cache.whole[2].nbytes, wide_lay.nbytes]


def attention_blocks(name: str):
    """Block types for attention's projections and the output head (each moves into a plane kind)."""
    return {"attn_q": Q.Q4_K, "attn_kv_a_mqa": Q.Q8_0, "attn_output": Q.Q5_0}.get(name.split(".")[-2], Q.Q6_K)


@pytest.mark.parametrize("mode", ["gpu", "hybrid"])
def test_attention_and_output_head_stay_in_the_files_blocks_while_offloading(wide, tmp_path, mode):
    """Q4_K, Q8_0 and Q5_0 projections and a Q6_K output head run from their blocks while offloading (dequantized
    all resident) and compute the file's function: transformers with gguf's dequantized weights."""
    from hybrid.kernels.quant_gpu import QuantizedLinear
    path = write_gguf(wide, tmp_path / "m.gguf", experts=q4_k_m, linear=attention_blocks)
    oracle = dequantized_oracle(wide, tmp_path, types=q4_k_m, linear=attention_blocks)
    budget = None if mode == "gpu" else budget_for(wide, 20, experts="q4k")
    e = Engine(str(path), RunConfig(**RUN, mode=mode, gpu_memory=budget, prefill_scratch=0), progress=False)
    attn = [layer[1] for layer in e.model.layers]
    kept = [isinstance(f, QuantizedLinear) for a in attn for f in (a.q_in, a.kv_in, a.o_proj)]
    kept.append(isinstance(e.model.lm_head, QuantizedLinear))
    assert all(kept) if mode != "gpu" else not any(kept) and all(a.in_proj is not None for a in attn)
    assert_same_function(e, oracle)


def test_all_resident_keeps_the_files_blocks_only_where_its_budget_needs_them(wide, tmp_path):
    """Mode gpu with a --gpu-memory that holds every expert beside the non-expert weights in the file's blocks but
    not beside their float copies keeps the blocks (attention, output head, shared experts, dense MLP) and computes
    the file's function; a budget that holds the copies takes them (they decode faster); less than the blocks need
    is refused."""
    from dataclasses import replace
    from hybrid.kernels.quant_gpu import QuantizedLinear
    from hybrid.offload.budget import BudgetError
    from hybrid.offload.mode_choice import resident_room
    from hybrid.offload.runtime import experts_bytes
    path = write_gguf(wide, tmp_path / "m.gguf", experts=q4_k_m, linear=attention_blocks)
    ckpt = GgufCheckpoint(path)
    cfg, big = ckpt.config, 1 << 40
    run = RunConfig(**RUN, mode="gpu", experts="q4k", gpu_memory=big, prefill_scratch=0, prefill_chunk_tokens=256)
    need = experts_bytes(cfg, run, 4, ckpt)
    fixed = {b: big - resident_room(cfg, replace(run, file_blocks=b), torch.device("cpu"), 4, 0, ckpt)
             for b in (False, True)}
    assert fixed[True] < fixed[False]
    oracle = dequantized_oracle(wide, tmp_path, types=q4_k_m, linear=attention_blocks)
    for budget, blocks in ((fixed[True] + need, True), (fixed[False] + need, False)):
        e = Engine(str(path), replace(run, experts="auto", gpu_memory=budget), progress=False)
        kept = [isinstance(m, QuantizedLinear) for m in (e.model.lm_head, e.model.layers[1][1].o_proj)]
        kept.append(isinstance(e.model.layers[1][3].shared, QuantizedFFN))
        assert e.run.file_blocks == blocks and kept == [blocks] * 3 and ("file's blocks" in e.mode_note) == blocks
        if blocks:
            assert_same_function(e, oracle)
    with pytest.raises(BudgetError, match="mode gpu keeps every expert resident"):
        Engine(str(path), replace(run, experts="auto", gpu_memory=fixed[True] + need - 4096), progress=False)


def test_the_quantized_linear_kernel_computes_the_torch_path(wide, tmp_path):
    """QuantizedLinear's Triton kernel (in Triton's interpreter) against the dequantized matrix, for each plane
    kind the file's blocks move into, at decode and prefill row counts."""
    from hybrid.kernels import quant_gpu
    if quant_gpu.triton is None:
        pytest.skip("Triton is not installed")
    m = GgufCheckpoint(write_gguf(wide, tmp_path / "m.gguf", experts=q4_k_m, linear=attention_blocks))
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
                 "model.layers.1.self_attn.o_proj.weight", "lm_head.weight"):
        mat = m.linear_layout(name)
        lin = quant_gpu.QuantizedLinear(m.linear_planes(name, mat), mat)
        for rows in (3, 130):
            x = torch.randn(rows, mat.cols)
            assert rel_err(quant_gpu.triton_linear(x, lin.planes, mat), lin(x)) <= 1e-5, (name, rows)


def test_a_decode_sized_linear_splits_its_columns_and_sums_the_parts_the_same_for_every_row_count():
    """At 1-128 rows a matrix of few output rows splits K over more programs (kv_a: 18 programs of 16 tiles on a
    GPU of 132 SMs), fp32 partial sums added in a fixed order: for each plane kind the split kernel (in Triton's
    interpreter) computes the dequantized matrix's product, and a row's result does not depend on how many rows
    run beside it (a sequence's tokens are the same alone and in a batch)."""
    from hybrid.kernels import quant_gpu
    from hybrid.model.quant import Matrix, dequantize_matrix, quantize_matrix
    if quant_gpu.triton is None:
        pytest.skip("Triton is not installed")
    assert [quant_gpu.k_split(p, 16, 132) for p in (18, 64, 96, 3200)] == [8, 8, 4, 1]
    assert quant_gpu.k_split(18, 2, 132) == 1 and quant_gpu.k_split(2, 8, 1) == 2
    torch.manual_seed(0)
    N, K = 32, 1024                                                     # 1 program, 8 tiles of 128: 4 parts
    x = torch.randn(16, K)
    for kind in ("q4", "q8", "q5", "q4k", "q6k"):
        mat = Matrix(N, K, kind, 0)
        planes = quantize_matrix(torch.randn(N, K) * 0.05, kind)
        want = x @ dequantize_matrix(planes, mat).float().T                                  # [16, N]
        y = quant_gpu.triton_linear(x, planes, mat)
        assert rel_err(y, want) <= 1e-5, kind
        assert torch.equal(quant_gpu.triton_linear(x[:1], planes, mat), y[:1]), kind


def test_attention_in_blocks_counts_at_its_size_in_the_budget(wide, tmp_path):
    """Attention's projections and the output head kept in blocks count at their planes' bytes in the plan."""
    from hybrid.offload.runtime import device_weight_bytes
    plain = GgufCheckpoint(write_gguf(wide, tmp_path / "p.gguf", experts=q4_k_m))
    kept = GgufCheckpoint(write_gguf(wide, tmp_path / "k.gguf", experts=q4_k_m, linear=attention_blocks))
    cfg = kept.config
    names = [f"model.layers.{L}.{hf}.weight" for L in range(cfg.num_hidden_layers) for hf in LINEARS.values()]
    mats = [kept.linear_layout(n) for n in names + ["lm_head.weight"]]
    assert all(m is not None for m in mats) and {m.kind for m in mats} == {"q4k", "q8", "q5", "q6k"}
    assert all(plain.linear_layout(n) is None for n in names)                     # F32 in that file
    saved = sum(m.rows * m.cols * 2 - m.nbytes for m in mats)
    assert device_weight_bytes(cfg, kept, 2) == device_weight_bytes(cfg, plain, 2) - saved


def test_shared_experts_in_blocks_count_at_their_size_in_the_budget(wide, tmp_path):
    """The memory plan counts carried shared experts and dense MLPs at their planes' bytes; a file whose are F32
    (dequantized at load) counts them at the compute dtype's size."""
    from hybrid.model.layout import device_weight_numel
    from hybrid.offload.runtime import device_weight_bytes
    m, f = GgufCheckpoint(write_gguf(wide, tmp_path / "m.gguf", experts=q4_k_m)), \
        GgufCheckpoint(write_gguf(wide, tmp_path / "f.gguf"))
    cfg, full = m.config, device_weight_numel(m.config) * 2
    shared = 3 * cfg.hidden_size * cfg.moe_intermediate_size * cfg.n_shared_experts * 2
    lays = [m.ffn_layout(L, "shared") for L in cfg.moe_layers]
    dense = m.ffn_layout(0, "dense")
    downs = {L: "q8" if L % 2 else "q5" for L in range(cfg.num_hidden_layers)}       # Q8_0 / Q5_0 as they are
    assert all(lay is not None and lay.w13.kind == "q4k" and lay.w2.kind == downs[L]
               for L, lay in zip(cfg.moe_layers + [0], lays + [dense]))
    saved = sum(shared - lay.nbytes for lay in lays) + 3 * cfg.hidden_size * cfg.intermediate_size * 2 - dense.nbytes
    assert device_weight_bytes(cfg, m, 2) == full - saved < full
    assert f.ffn_layout(cfg.moe_layers[0], "shared") is None and device_weight_bytes(cfg, f, 2) == full


def test_own_q4_k_q5_0_and_q6_k_encoders_write_blocks_ggufs_dequantizer_reads():
    """And Q6_K's blocks move into q6k planes that dequantize to exactly what gguf reads."""
    from hybrid.model.ggml_blocks import q6k_planes
    from hybrid.model.quant import Matrix, dequantize_matrix, plane_bytes
    w = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)
    for kind, tol in ((Q.Q4_K, 0.15), (Q.Q5_0, 0.07), (Q.Q6_K, 0.04)):
        back = dequantize(ENCODE[kind](w), kind)
        assert back.shape == w.shape and 0 < np.linalg.norm(back - w) / np.linalg.norm(w) < tol
    raw = encode_q6_k(w)
    moved = dequantize_matrix(plane_bytes(q6k_planes(raw)), Matrix(16, 512, "q6k", 0))
    assert np.array_equal(moved.numpy(), dequantize(raw, Q.Q6_K))


def test_other_architectures_and_broken_files_are_one_clear_error(tmp_path):
    w = GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="architecture 'llama' is not supported"):
        Engine(str(tmp_path / "llama.gguf"), RunConfig(**RUN), progress=False)
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="not a readable GGUF"):
        Engine(str(tmp_path / "bad.gguf"), RunConfig(**RUN), progress=False)


def test_a_missing_tensor_is_named_before_anything_loads(tiny, tmp_path):
    path = write_gguf(tiny, tmp_path / "t.gguf", drop=("blk.2.ffn_up_exps.weight",))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.experts\.0\.up_proj\.weight is missing"):
        Engine(str(path), RunConfig(**RUN), progress=False)


def test_a_gguf_without_tokenizer_metadata_takes_the_tokenizer_json_beside_it(tmp_path):
    from hybrid.engine.tokenizer import find_tokenizer_dir
    (tmp_path / "tokenizer.json").write_text("{}")
    assert find_tokenizer_dir(tmp_path / "model-Q8_0.gguf") == tmp_path


@pytest.mark.skipif(not (PEER / "lcpp.tgz").exists(), reason="no llama.cpp source in ../shared/peers/llamacpp")
def test_llamacpps_own_converter_at_f32_gives_the_checkpoints_logits(tiny, tmp_path, tokenizer_dir):
    with tarfile.open(PEER / "lcpp.tgz") as t:
        t.extractall(tmp_path, filter="data")
    hf = tmp_path / "hf"
    shutil.copytree(tiny, hf)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, hf / f)
    out = tmp_path / "tiny-f32.gguf"
    r = subprocess.run([sys.executable, str(PEER / "convert.py"), str(tmp_path / "llama.cpp"), str(hf),
                        "--outtype", "f32", "--outfile", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    e = Engine(str(out), RunConfig(**RUN), progress=False)
    assert rel_err(e.logits(PROMPTS[0]), make(tiny).logits(PROMPTS[0])) <= 1e-6
    assert not (tmp_path / "tokenizer.json").exists()                # the tokenizer comes from the metadata alone
    own, ref = load_tokenizer(out), load_tokenizer(None, tokenizer_dir)
    for text in ("Hello world! 12345", "你好，世界。", " spaces\n\nand lines\r\n\t", "émigré Ωmega ＡＢＣ", "x**2  # c"):
        assert own.encode(text) == ref.encode(text) and own.decode(own.encode(text)) == text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    assert own.chat(chat) == ref.chat(chat) and own.chat(chat)[0] == own.bos_token_id == 100000


def write_tokenizer_gguf(path, pre="deepseek-llm"):
    """A GGUF holding only a small byte-level BPE tokenizer in llama.cpp's keys."""
    from tokenizers.pre_tokenizers import ByteLevel
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + ["he", "ll", "hell", "hello", "Ġw", "<|bos|>", "<|eos|>", "[PAD]"]
    w = GGUFWriter(str(path), "deepseek2")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 3) + [3, 3, 5])
    w.add_token_merges(["h e", "l l", "he ll", "hell o", "Ġ w"])
    w.add_bos_token_id(len(tokens) - 3)
    w.add_eos_token_id(len(tokens) - 2)
    w.add_chat_template("{{ bos_token }}{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, tokens


def test_a_ggufs_tokenizer_and_chat_template_come_from_its_metadata(tmp_path):
    path, tokens = write_tokenizer_gguf(tmp_path / "t.gguf")
    tok = load_tokenizer(path)
    ids = tok.encode("hello world 42")
    assert [tokens[i] for i in ids[:2]] == ["hello", "Ġw"] and tok.decode(ids) == "hello world 42"
    assert [tokens[i] for i in tok.encode("42")] == ["4", "2"]                    # digits one by one
    assert tok.decode(ids + [tokens.index("[PAD]"), tokens.index("<|eos|>")]) == "hello world 42"   # never text
    assert tok.chat([{"role": "user", "content": "hello"}]) == [tokens.index("<|bos|>")] + tok.encode("user: hello")
    with pytest.raises(TokenizerError, match=r"pre-tokenizer qwen2\) is not supported"):
        load_tokenizer(write_tokenizer_gguf(tmp_path / "q.gguf", pre="qwen2")[0])


def test_a_gguf_is_parsed_once_for_its_tokenizer_and_its_weights(tiny, tmp_path):
    """The tokenizer and the checkpoint share one parse of the file; a file written anew is parsed anew."""
    from hybrid.model.gguf_checkpoint import read_gguf
    path, _ = write_tokenizer_gguf(tmp_path / "t.gguf")
    load_tokenizer(path)
    assert read_gguf(path) is read_gguf(str(path))
    first = read_gguf(path)
    path.unlink()
    write_tokenizer_gguf(path, pre="qwen2")
    assert read_gguf(path) is not first
    model = write_gguf(tiny, tmp_path / "m.gguf")
    assert GgufCheckpoint(model).reader is read_gguf(model)

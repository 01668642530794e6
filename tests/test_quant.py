"""Quantized experts (q8, q4, q4k): the format, the kernels, and the engine computing the dequantized model's function
in every mode, against transformers loaded with the dequantized expert weights."""
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import PROMPTS, budget_for, make, rel_err
from hybrid.engine.sampling import SamplingParams
from hybrid.kernels.cpu_experts import CpuExperts
from hybrid.kernels.quant_gpu import torch_grouped_qffn, triton_grouped_qffn
from hybrid.model.checkpoint import Checkpoint
from hybrid.model.config import ConfigError, ModelConfig
from hybrid.model.deepseek import gated_ffn
from hybrid.model.quant import (GROUP, Matrix, dequantize_expert, dequantize_matrix, dequantize_parts, layout,
                                plane_bytes, quantize_expert, quantize_matrix, split_planes)
from hybrid.model.synthetic import PRESETS
from hybrid.offload.quantized import quantized_path

CFG = ModelConfig.from_dict({**PRESETS["tiny"][0], "hidden_size": 256, "moe_intermediate_size": 64})
FORMATS = ["q8", "q5", "q4", "q4k"]
GREEDY = SamplingParams(max_new_tokens=10, stop_on_eos=False)


def experts(fmt, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    lay = layout(CFG, fmt)
    I, H = 64, 256
    return lay, torch.stack([quantize_expert(lay, torch.randn(I, H, generator=g) * .1,
                                             torch.randn(I, H, generator=g) * .1,
                                             torch.randn(H, I, generator=g) * .1) for _ in range(n)])


def expert_views(lay, inter, g, n=3):
    """n experts of hidden 256 in layout `lay`, drawn from generator g, as (w13, w2) planes."""
    return [split_planes(lay, quantize_expert(lay, *(torch.randn(*s, generator=g) * .1 for s in
                                                     ((inter, 256), (inter, 256), (256, inter))))) for _ in range(n)]


def dequantized_ref(lay, views, x, starts, counts, dtype=torch.bfloat16):
    """The experts' rows computed by torch on the dequantized weights."""
    return torch.cat([gated_ffn(x[s:s + c], *dequantize_parts(lay, *views[j], dtype))
                      for j, (s, c) in enumerate(zip(starts, counts))])


def inline_and_pooled(lay, views, x, starts, counts, **kw) -> CpuExperts:
    """The native kernel inline and on a pool of 2 (CpuExperts options `kw`): each within bf16's rounding of the
    dequantized reference, the two bit for bit; -> the pooled one."""
    ref, outs = dequantized_ref(lay, views, x, starts, counts), []
    for pool in (0, 2):
        k = CpuExperts("native", pool_threads=pool, quant=lay, **kw)
        out = torch.full_like(x, float("nan"))
        k.run(x, out, [v[0] for v in views], [v[1] for v in views], starts, counts)
        assert torch.isfinite(out).all() and rel_err(out.float(), ref.float()) <= 1e-2
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    return k


@pytest.mark.parametrize("kind, bits, tol", [("q8", 8.5, 0.01), ("q5", 5.5, 0.06), ("q4", 5, 0.12),
                                             ("q4k", 4.625, 0.12)])
def test_quantization_round_trips_and_requantizing_changes_nothing(kind, bits, tol):
    w = torch.randn(64, 512) * 0.02
    mat = Matrix(64, 512, kind, 0)
    buf = quantize_matrix(w, kind)
    assert buf.numel() == mat.nbytes == 64 * 512 * bits / 8
    deq = dequantize_matrix(buf, mat)
    assert 0 < rel_err(deq, w) < tol
    if kind != "q4k":               # (Q4_K's rounding of its 6-bit scales is not idempotent)
        assert torch.equal(quantize_matrix(deq, kind), buf)


def test_q4_packs_nibbles_in_ggml_block_order_with_scale_and_min():
    w = torch.arange(32, dtype=torch.float32).reshape(1, 32) * 0.5 - 3.0     # d = 0.5, m = -3, q = 0..15, 15..
    w[0, 16:] = w[0, :16]
    q, d, m, _, _ = Matrix(1, 32, "q4", 0).planes(quantize_matrix(w, "q4"))
    assert d.item() == 0.5 and m.item() == -3.0
    assert q[0].tolist() == [i | (i << 4) for i in range(16)]               # byte i: q[i] low, q[i + 16] high


def test_q8_is_symmetric_with_one_fp16_scale_per_32():
    w = torch.linspace(-1, 1, 64).reshape(1, 64)
    q, d, m, _, _ = Matrix(1, 64, "q8", 0).planes(quantize_matrix(w, "q8"))
    assert m is None and d.dtype == torch.float16 and d.shape == (1, 64 // GROUP)
    assert q.dtype == torch.int8 and q.abs().max().item() == 127


def test_formats_need_rows_in_whole_groups():
    with pytest.raises(ConfigError, match="multiples of 32"):
        layout(ModelConfig.from_dict({**PRESETS["tiny"][0], "moe_intermediate_size": 48}), "q4")
    with pytest.raises(ConfigError, match="multiple of 256"):
        layout(ModelConfig.from_dict(PRESETS["tiny"][0]), "q4k")


def test_q5_holds_q5_0_blocks_as_they_are_and_dequantizes_as_gguf_does():
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize
    from hybrid.model.ggml_blocks import encode_q5_0, planes
    w = torch.randn(64, 256) * 0.02
    raw = encode_q5_0(w.numpy())
    want = torch.from_numpy(dequantize(raw, Q.Q5_0))
    mat = Matrix(64, 256, "q5", 0)
    moved = plane_bytes(planes(raw, "Q5_0", "q5"))
    assert moved.numel() == raw.nbytes == mat.nbytes                 # the blocks' bytes, planar
    assert torch.equal(dequantize_matrix(moved, mat), want)
    assert torch.equal(quantize_matrix(w, "q5"), moved)
    q8 = Matrix(64, 256, "q8", 0)                                    # beside Q8_0 in one tensor: widened, the same
    assert torch.equal(dequantize_matrix(plane_bytes(planes(raw, "Q5_0", "q8")), q8), want)


def test_q4k_is_q4_k_gate_up_with_a_q8_down_and_dequantizes_as_gguf_does():
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize
    from hybrid.model.ggml_blocks import encode_q4_k
    lay = layout(CFG, "q4k")
    assert (lay.w13.kind, lay.w2.kind) == ("q4k", "q8")
    w = torch.randn(128, 256) * 0.02
    want = dequantize(encode_q4_k(w.numpy()), Q.Q4_K)
    assert torch.equal(dequantize_matrix(quantize_matrix(w, "q4k"), Matrix(128, 256, "q4k", 0)),
                       torch.from_numpy(want))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("march", ["native", "x86-64-v2"])
@pytest.mark.parametrize("pool", [0, 2])
def test_cpu_kernel_reads_quantized_experts_exactly(fmt, march, pool):
    lay, bufs = experts(fmt, 3)
    views = [split_planes(lay, b) for b in bufs]
    starts, counts = [0, 1, 6], [1, 5, 20]                                 # 20: more than the dense kernel takes
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        k = CpuExperts("native", pool_threads=pool, march=march, quant=lay)
        x = torch.randn(26, 256).to(dt)
        out = torch.empty_like(x)
        k.run(x, out, [v[0] for v in views], [v[1] for v in views], starts, counts)
        ref = dequantized_ref(lay, views, x, starts, counts, dt)
        assert rel_err(out.float(), ref.float()) <= tol


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dot, march", [("off", "native"), ("emulate", "native"), ("auto", "native"),
                                        ("emulate", "x86-64-v2")])
def test_cpu_dot_path_reads_quantized_experts_exactly(fmt, dot, march):
    """Sizes in whole blocks of 128: at up to 2 tokens per expert on average, q4 / q4k gate-up (and q4 down) take
    the bf16 dot-product path, which sums d (q x) + m x per group (so its sums differ from the plain path's); more
    tokens take the plain path. Every path agrees with the dequantized reference, pool and inline bit for bit."""
    inter = 128
    cfg = ModelConfig.from_dict({**PRESETS["tiny"][0], "hidden_size": 256, "moe_intermediate_size": inter})
    lay, g = layout(cfg, fmt), torch.Generator().manual_seed(1)
    views = expert_views(lay, inter, g)
    for counts in ([1, 2, 3], [1, 5, 7]):
        starts = [0, counts[0], counts[0] + counts[1]]
        x = torch.randn(sum(counts), 256, generator=g).bfloat16()
        k = inline_and_pooled(lay, views, x, starts, counts, dot=dot, march=march)
        took = k.lib.moe_dot_layouts(1, 3, sum(counts), 256, inter, 0, lay.code, k.dot)
        expect = {"q8": 0, "q5": 0, "q4": 4 * 2 + 2, "q4k": 4 * 2}[fmt] if k.dot and sum(counts) <= 6 else 0
        assert took == expect


@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_grouped_kernel_matches_the_dequantized_reference(fmt):
    """Runs in Triton's interpreter (conftest sets TRITON_INTERPRET): float32, empty slots, a slot with more rows
    than a block."""
    lay, slots = experts(fmt, 5)
    counts = torch.tensor([2, 0, 19, 0, 1])
    offs = counts.cumsum(0).to(torch.int32)
    xs = torch.randn(int(counts.sum()), 256)
    ref = torch_grouped_qffn(xs, offs, slots, lay)
    assert rel_err(triton_grouped_qffn(xs, offs, slots, lay, bm=16), ref) <= 1e-5
    w13, w2 = dequantize_expert(lay, slots[2], torch.float32)
    assert rel_err(ref[2:21], gated_ffn(xs[2:21], w13, w2)) <= 1e-6


@pytest.mark.parametrize("down", ["q4k", "q6k"])
def test_a_shared_ffn_in_q4k_planes_down_included_runs_as_one_slot(down):
    """A GGUF file's shared experts (QuantizedFFN): one FFN whose down projection is Q4_K or Q6_K too (2,816 rows in
    V2-Lite: a whole number of 256-blocks), through the Triton kernel (interpreter) and its torch twin."""
    from hybrid.kernels import quant_gpu
    from hybrid.model import fused
    from hybrid.model.quant import ffn_layout
    g = torch.Generator().manual_seed(3)
    I, H = 512, 256
    lay = ffn_layout(I, H, ("q4k", down), "shared")
    planes = quantize_expert(lay, *(torch.randn(*s, generator=g) * .1 for s in ((I, H), (I, H), (H, I))))
    x = torch.randn(5, H)
    ffn = quant_gpu.QuantizedFFN(planes, lay)
    ref = gated_ffn(x, *dequantize_expert(lay, planes, torch.float32))
    assert rel_err(ffn(x), ref) <= 1e-6                                          # the torch twin (CPU tensors)
    xs, offs = x, torch.tensor([5], dtype=torch.int32)
    if fused.triton is not None:
        assert rel_err(triton_grouped_qffn(xs, offs, planes[None], lay, bm=16), ref) <= 1e-5


def dequantized_model(path, fmt: str, out):
    """transformers on the checkpoint at `path` with its routed experts replaced by their `fmt` dequantized
    weights: the function the engine must compute."""
    from transformers import AutoModelForCausalLM
    ckpt = Checkpoint(path)
    lay = layout(ckpt.config, fmt)
    for f in path.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
            continue
        tensors = load_file(f)
        for layer in ckpt.config.moe_layers:
            for e in range(ckpt.config.n_routed_experts):
                names = ckpt.expert_names(layer, e)
                if names[0] in tensors:
                    w13, w2 = dequantize_expert(lay, quantize_expert(lay, *(ckpt.get(n) for n in names)),
                                                torch.float32)
                    I = w13.shape[0] // 2
                    tensors.update(zip(names, (w13[:I], w13[I:], w2)))
        save_file(tensors, out / f.name)
    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def dequantized(tiny, tmp_path_factory):
    return {fmt: dequantized_model(tiny, fmt, tmp_path_factory.mktemp(f"deq_{fmt}")) for fmt in ("q8", "q5", "q4")}


@pytest.fixture(scope="module")
def q4k_oracle(wide, tmp_path_factory):
    return dequantized_model(wide, "q4k", tmp_path_factory.mktemp("deq_q4k"))


@pytest.mark.parametrize("mode", ["gpu", "fetch", "hybrid"])
def test_q4k_quantized_from_a_checkpoint_computes_the_dequantized_function(wide, q4k_oracle, mode):
    oracle = q4k_oracle
    budget = None if mode == "gpu" else budget_for(wide, 20, experts="q4k")
    e = make(wide, experts="q4k", mode=mode, gpu_memory=budget, prefill_scratch=0)
    prompts = [[1, 5, 900, 17, 33, 4, 8], [9, 8, 7]]
    for p, toks in zip(prompts, e.generate(prompts, GREEDY).tokens):
        with torch.no_grad():
            assert rel_err(e.logits(p), oracle(torch.tensor([p])).logits[0]) <= 1e-4
            assert toks == oracle.generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                                           min_new_tokens=10)[0, len(p):].tolist()


@pytest.mark.parametrize("fmt", ["q8", "q5", "q4"])
def test_resident_quantized_engine_equals_transformers_with_dequantized_experts(tiny, dequantized, fmt):
    e = make(tiny, experts=fmt)
    for p in PROMPTS:
        with torch.no_grad():
            assert rel_err(e.logits(p), dequantized[fmt](torch.tensor([p])).logits[0]) <= 1e-4
    out = e.generate(PROMPTS, GREEDY)                                       # a padded batch of three
    for p, toks in zip(PROMPTS, out.tokens):
        with torch.no_grad():
            ref = dequantized[fmt].generate(torch.tensor([p]), max_new_tokens=10, do_sample=False,
                                            min_new_tokens=10)[0, len(p):].tolist()
        assert toks == ref


@pytest.fixture(scope="module")
def resident(tiny):
    runs = {}
    for fmt in ("q8", "q5", "q4"):
        e = make(tiny, experts=fmt)
        runs[fmt] = e.generate(PROMPTS, GREEDY).tokens, e.logits(PROMPTS[0])
    return runs


@pytest.mark.parametrize("fmt", ["q8", "q5", "q4"])
@pytest.mark.parametrize("mode", ["fetch", "cpu", "hybrid"])
@pytest.mark.parametrize("prefetch", ["none", "gate"])
def test_every_mode_computes_the_same_quantized_function(tiny, resident, fmt, mode, prefetch):
    tokens, logits = resident[fmt]
    e = make(tiny, experts=fmt, mode=mode, prefetch=prefetch, prefill_scratch=0,
             gpu_memory=budget_for(tiny, 20, experts=fmt))
    assert e.backend.cache.n_slots == 20 and e.backend.cpu.experts.kind == "native"
    out = e.generate(PROMPTS, GREEDY)
    assert out.tokens == tokens
    assert rel_err(e.logits(PROMPTS[0]), logits) <= 1e-4
    x = out.stats.experts
    assert x.misses > 0
    assert x.fetched_bytes == x.fetched * layout(e.cfg, fmt).nbytes


def test_quantized_experts_are_kept_on_disk_and_read_back(tiny):
    path = quantized_path(Checkpoint(tiny), "q4")
    path.unlink(missing_ok=True)
    first = make(tiny, experts="q4", mode="fetch", prefill_scratch=0, gpu_memory=budget_for(tiny, 20, experts="q4"))
    stamp = path.stat().st_mtime_ns
    second = make(tiny, experts="q4", mode="cpu", prefill_scratch=0, gpu_memory=budget_for(tiny, 20, experts="q4"))
    assert path.stat().st_mtime_ns == stamp and second.backend.store.path == path
    assert torch.equal(first.backend.store.flat, second.backend.store.flat)


def test_quantized_slots_count_their_real_size_in_the_budget(tiny):
    budget = budget_for(tiny, 20)                                           # 20 float32 expert slots
    q4 = make(tiny, experts="q4", mode="fetch", gpu_memory=budget)
    cfg = q4.cfg
    ratio = cfg.expert_numel * 4 / layout(cfg, "q4").nbytes
    assert q4.backend.cache.n_slots >= min(len(cfg.moe_layers) * cfg.n_routed_experts, int(20 * ratio) - 1)


def test_quality_script_compares_each_format_with_the_unquantized_experts(tiny, tmp_path):
    import json
    import subprocess
    import sys
    from conftest import ROOT
    out = tmp_path / "quality.json"
    r = subprocess.run([sys.executable, str(ROOT / "eval" / "quant_quality.py"), "--model", str(tiny), "--tokenizer",
                        "bytes", "--tokens", "16", "--count", "2", "--out", str(out)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    rows = {row["experts"]: row for row in json.loads(out.read_text())["rows"]}
    assert rows["q8"]["positions"] == 32 and 0 < rows["q8"]["logits_rel_err"] < rows["q4"]["logits_rel_err"] < 0.2
    assert 0 <= rows["q4"]["kl_mean"] and 0 <= rows["q4"]["top1_agreement"] <= 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_dequantize_kernel_writes_the_dequantized_matrices(fmt):
    from hybrid.kernels.quant_gpu import plane_pointers
    from hybrid.kernels.quant_scratch import _dequant_matrix
    lay, slots = experts(fmt, 4)
    ids = torch.tensor([3, 1], dtype=torch.int32)
    for mat in (lay.w13, lay.w2):
        out = torch.empty(2, mat.rows, mat.cols)
        _dequant_matrix(slots, mat, plane_pointers(slots, mat), ids, out)
        assert torch.equal(out, dequantize_matrix(slots[[3, 1]], mat))


def test_scratch_ffn_chunks_active_slots_and_matches_the_reference():
    from hybrid.kernels.quant_scratch import CHUNK, ScratchFFN
    lay, slots = experts("q4", 2 * CHUNK + 3)
    counts = torch.tensor([(s * 7) % 5 for s in range(slots.shape[0])])          # some slots empty
    assert (counts > 0).sum() > CHUNK
    offs = counts.cumsum(0).to(torch.int32)
    xs = torch.randn(int(counts.sum()), 256)
    ref = torch_grouped_qffn(xs, offs, slots, lay)
    assert rel_err(ScratchFFN(slots, lay, torch.float32)(xs, offs.numpy()), ref) <= 1e-6
    kernels = ScratchFFN(slots, lay, torch.float32)
    kernels.cuda = True                  # a GPU's route: the Triton kernel (here in its interpreter), one upload a chunk
    out = torch.full_like(xs, float("nan"))
    assert kernels(xs, offs.numpy(), out=out) is out and rel_err(out, ref) <= 1e-6


def test_long_prefill_takes_the_scratch_path_and_stays_exact(tiny):
    e = make(tiny, experts="q4", mode="fetch", prefill_scratch=8, gpu_memory=budget_for(tiny, 20, experts="q4", scratch=8))
    assert e.backend.cache.n_slots == 20 and e.backend.waves.scratch.chunk == 8
    calls, scratch = [], e.backend.waves.scratch

    class Spy:                               # the scratch, counting the rows of each call
        chunk = scratch.chunk

        def __call__(self, xs, ends, lay, out):
            calls.append(xs.shape[0])
            return scratch(xs, ends, lay, out=out)
    e.backend.waves.scratch = Spy()
    prompt = [(7 * i) % 500 + 3 for i in range(100)]
    assert rel_err(e.logits(prompt), make(tiny, experts="q4").logits(prompt)) <= 1e-4
    assert calls and min(calls) >= 128


def test_prefill_scratch_takes_at_most_a_quarter_of_the_cache_room(tiny):
    from hybrid.offload.budget import plan_memory
    cfg, per = Checkpoint(tiny).config, Checkpoint(tiny).config.expert_numel * 4
    q4 = layout(cfg, "q4").nbytes

    def plan(budget, want=None):
        return plan_memory(cfg, budget, 1, 64, 4, 4096, 18, margin=0, slot_bytes=q4, scratch_expert=per,
                           scratch_experts=want)
    base = plan(1 << 40).budget - plan(1 << 40).cache_bytes - 8 * per     # what everything but cache and scratch takes
    for room in (0, per, 3 * per, 4 * per, 9 * per, 40 * per):
        p = plan(base + room)
        assert p.scratch_experts == min(8, room // (4 * per)) and p.scratch_experts * per <= room / 4
    assert plan(base + 40 * per, want=0).scratch_experts == 0 and "prefill scratch: 8" in plan(1 << 40).describe()


AOT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from hybrid.kernels import quant_gpu, quant_scratch
target, planes = GPUTarget("cuda", 90, 32), ("q_ptr", "d_ptr", "m_ptr", "sc_ptr", "mn_ptr")
def types(kind):
    return dict(zip(planes, ("*u8", "*fp16", "*i32" if kind == 5 else "*fp16", "*u8", "*u8")))
for kind in (1, 2, 3, 5):
    tile = {"KIND": kind, "BM": 16, "BN": 32, "BK": 128, "PREC": "tf32"}
    for fn, rows, extra in ((quant_gpu._gate_up_kernel, ("x_ptr", "h_ptr"), {"I": 64, "K": 256}),
                            (quant_gpu._down_kernel, ("h_ptr", "y_ptr"), {"N": 256, "K": 64})):
        sig = {**dict.fromkeys(rows, "*bf16"), "bounds_ptr": "*i32", "order_ptr": "*i32", **types(kind),
               "slot_bytes": "i64", **dict.fromkeys([*extra, *tile], "constexpr")}
        triton.compile(triton.compiler.ASTSource(fn=fn, signature=sig, constexprs={**extra, **tile}), target=target)
    for y, split in (("*bf16", 1), ("*fp32", 4)):
        sig = {"x_ptr": "*bf16", "y_ptr": y, "M": "i32", **types(kind),
               **dict.fromkeys(("N", "K", *tile, "KSPLIT"), "constexpr")}
        triton.compile(triton.compiler.ASTSource(fn=quant_gpu._linear_kernel, signature=sig,
                                                 constexprs={"N": 64, "K": 1024, **tile, "KSPLIT": split}),
                       target=target)
    sig = {**types(kind), "ids_ptr": "*i32", "out_ptr": "*bf16", "slot_bytes": "i64",
           **dict.fromkeys(("R", "C", "KIND", "BR", "BC"), "constexpr")}
    triton.compile(triton.compiler.ASTSource(fn=quant_scratch._dequant_kernel, signature=sig,
                                             constexprs={"R": 64, "C": 256, "KIND": kind, "BR": 8, "BC": 128}),
                   target=target)
sig = {"part_ptr": "*fp32", "y_ptr": "*bf16", "MN": "i32", "KSPLIT": "constexpr", "B": "constexpr"}
triton.compile(triton.compiler.ASTSource(fn=quant_gpu._split_sum, signature=sig, constexprs={"KSPLIT": 4, "B": 1024}),
               target=target)
print("compiled")
"""


def test_quantized_kernels_compile_for_the_h200():
    """The grouped decode kernels, the linear kernel (whole, and split over K with its sum) and prefill's dequantize
    kernel for every expert plane kind, compiled ahead of time for the GPU box's Hopper (sm_90) by Triton's own
    ptxas: a kernel the interpreter runs may still fail to compile there (conftest turns the interpreter on for this
    process: a child runs without)."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", AOT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "compiled" in r.stdout, r.stderr[-2000:]


@pytest.mark.parametrize("dot, march", [("off", "native"), ("emulate", "native"), ("off", "x86-64-v2")])
def test_cpu_kernel_reads_q4k_gate_up_with_a_q5_down(dot, march):
    """A Q4_K_M layer with Q5_0 downs as the file holds it: q4k gate/up (on the dot path where it runs) and a q5
    down, against the dequantized reference; at 1 and 7 tokens per expert."""
    from hybrid.model.quant import ffn_layout
    lay, g = ffn_layout(128, 256, ("q4k", "q5"), "q4k"), torch.Generator().manual_seed(2)
    views = expert_views(lay, 128, g, 2)
    for counts in ([1, 1], [7, 3]):
        x = torch.randn(sum(counts), 256, generator=g).bfloat16()
        inline_and_pooled(lay, views, x, [0, counts[0]], counts, dot=dot, march=march)
    assert lay.code == 3 + 4 * 5


@pytest.mark.parametrize("fmt", FORMATS + ["q4k+q5"])
@pytest.mark.parametrize("tiles, march", [("emulate", "native"), ("auto", "native"), ("emulate", "x86-64-v2")])
def test_cpu_tile_path_reads_quantized_experts(fmt, tiles, march):
    """More than QUANT_TILE_TOKENS tokens per expert on average, bf16 activations: the tile path (AMX where the CPU
    has it, else its emulation), the weights dequantized to bf16 16 rows at a time, against the dequantized
    reference; pool and inline bit for bit; fewer tokens stay on the vector path."""
    from hybrid.kernels.cpu_experts import QUANT_TILE_TOKENS
    from hybrid.model.quant import ffn_layout
    lay = ffn_layout(128, 256, ("q4k", "q5"), "q4k") if fmt == "q4k+q5" else layout(ModelConfig.from_dict(
        {**PRESETS["tiny"][0], "hidden_size": 256, "moe_intermediate_size": 128}), fmt)
    g = torch.Generator().manual_seed(3)
    views = expert_views(lay, 128, g)
    counts = [QUANT_TILE_TOKENS + 1, 2, 40]
    starts = [0, counts[0], counts[0] + counts[1]]
    x = torch.randn(sum(counts), 256, generator=g).bfloat16()
    k = inline_and_pooled(lay, views, x, starts, counts, tiles=tiles, march=march)
    assert k._mode(x, 128, counts) == k.tiles and k._mode(x, 128, [2 * QUANT_TILE_TOKENS - 1, 1]) == 0
    if tiles == "emulate":
        assert k.tiles == 2
    assert CpuExperts("native", quant=lay, tiles="off")._mode(x, 128, counts) == 0     # no tiles: vector path


@pytest.mark.parametrize("mode", ["cpu", "hybrid"])
def test_engine_prefill_on_the_quantized_tile_path(tiny, mode):
    """bf16, a prompt long enough that the CPU lane's calls average more than QUANT_TILE_TOKENS tokens per expert:
    they take the tile path (emulated here, so every CPU runs it) and give the vector path's logits up to bf16
    rounding of the weights."""
    prompt = list(range(10, 74))                                      # 64 tokens x 4 picks / 16 experts
    logits, modes = {}, []
    for tiles in ("off", "emulate"):
        e = make(tiny, experts="q4", mode=mode, dtype="bfloat16", cpu_tiles=tiles,
                 gpu_memory=budget_for(tiny, 20, experts="q4", itemsize=2))
        assert e.backend.cache.n_slots < 3 * 16                     # misses: the CPU lane runs them
        k = e.backend.cpu.experts
        pick = k._mode
        k._mode = lambda *a, pick=pick: modes.append((tiles, pick(*a))) or modes[-1][1]
        logits[tiles] = e.logits(prompt).float()
    assert ("emulate", 2) in modes and all(m == 0 for t, m in modes if t == "off")
    assert rel_err(logits["emulate"], logits["off"]) <= 2e-2

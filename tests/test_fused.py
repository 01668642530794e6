"""The decode step's fused Triton kernels (run in Triton's interpreter on CPU tensors: conftest sets TRITON_INTERPRET)
compute what their torch twins compute, and a whole forward through them gives the twins' logits and tokens. In
float32: the interpreter truncates where a GPU rounds to bfloat16 (eval/probes/fused_probe.py checks bfloat16 there)."""
import pytest
import torch

from conftest import PROMPTS, make, rel_err
from hybrid.engine.sampling import SamplingParams
from hybrid.model import fused, fused_moe
from hybrid.model.decode_attention import decode_attention

pytestmark = pytest.mark.skipif(fused.triton is None, reason="Triton is not installed")


@pytest.fixture
def kernels(monkeypatch):
    """Calls into `fused` take the Triton path, on CPU tensors."""
    monkeypatch.setattr(fused, "on_triton", lambda t: True)


def twin(fn, *args):
    saved = fused.on_triton
    fused.on_triton = lambda t: False
    try:
        return fn(*args)
    finally:
        fused.on_triton = saved


def test_add_rms_norm_matches_the_twin(kernels):
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(2, 3, 130, generator=g)
    x, d = wide[..., :96], torch.randn(2, 3, 96, generator=g)          # rows of stride 130, 96 wide (masked)
    w = torch.randn(96, generator=g)
    s, h = fused.add_rms_norm(x, d, w, 1e-6)
    s_ref, h_ref = twin(fused.add_rms_norm, x, d, w, 1e-6)
    assert torch.equal(s, s_ref) and s.shape == h.shape == x.shape
    assert rel_err(h, h_ref) <= 1e-6
    e = torch.randn(2, 3, 96, generator=g)
    s3, h3 = fused.add_rms_norm(x, d, w, 1e-6, e)
    s3_ref, h3_ref = twin(fused.add_rms_norm, x, d, w, 1e-6, e)
    assert torch.equal(s3, s3_ref) and rel_err(h3, h3_ref) <= 1e-6 and torch.equal(s3, x + (d + e))
    alone = fused.add_rms_norm(x, None, w, 1e-6)
    assert alone[0] is x and rel_err(alone[1], twin(fused.add_rms_norm, x, None, w, 1e-6)[1]) <= 1e-6


@pytest.mark.parametrize("graph", [False, True])
def test_mla_prep_ropes_q_and_writes_the_cache_as_the_twin(kernels, graph):
    from hybrid.model.rope import Rope
    from hybrid.model.synthetic import PRESETS
    from hybrid.model.config import ModelConfig
    cfg = ModelConfig.from_dict(PRESETS["tiny"][0])
    B, T, H, C, R = 2, 1 if graph else 3, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    QW = H * (cfg.qk_nope_head_dim + R)
    both, w = torch.randn(B, T, QW + C + R), torch.randn(C)          # q and kv as views of one projection
    rot = Rope(cfg, "cpu").rotation(torch.arange(5, 5 + T).expand(B, T))
    where = torch.tensor([7]) if graph else None
    outs = []
    for run in (fused.mla_prep, lambda *a: twin(fused.mla_prep, *a)):
        cc, pc, out = torch.zeros(B, 16, C), torch.zeros(B, 16, R), both.clone()
        nope, pe = run(out[..., :QW].view(B, T, H, -1), out[..., QW:], rot, w, 1e-6, cc, pc, 4, where)
        outs.append((nope, pe, cc, pc))
    for a, b in zip(*outs):
        assert rel_err(a, b) <= 1e-6
    written = outs[1][2].abs().sum(-1) > 0                                                   # [B, 16]
    assert written.sum() == B * T and written[:, 7 if graph else 4].all()


@pytest.mark.parametrize("S,chunk", [(40, 256), (100, 32), (100, None)])
def test_decode_attention_is_softmax_attention_over_the_unmasked_slots(S, chunk):
    g = torch.Generator().manual_seed(S)
    B, H, C, R = 3, 4, 32, 16
    ql, qp = torch.randn(B, H, 1, C, generator=g), torch.randn(B, H, 1, R, generator=g)
    kc, kp = torch.randn(B, S, C, generator=g), torch.randn(B, S, R, generator=g)
    mask = torch.zeros(B, 1, 1, S)
    mask[0, ..., 35:] = -1e30                                      # a short sequence: the rest of the capacity
    mask[1, ..., :33] = -1e30                                      # left padding, whole blocks of it skipped
    got = decode_attention(ql, qp, kc, kp, mask, 0.3, chunk=chunk)
    scores = (ql @ kc[:, None].transpose(-1, -2) + qp @ kp[:, None].transpose(-1, -2)) * 0.3 + mask
    assert got.shape == ql.shape and rel_err(got, scores.softmax(-1) @ kc[:, None]) <= 1e-5


def test_silu_mul_matches_the_twin(kernels):
    gu = torch.randn(5, 2 * 72)
    assert rel_err(fused.silu_mul(gu), twin(fused.silu_mul, gu)) <= 1e-6


@pytest.mark.parametrize("norm,T", [(True, 7), (False, 7), (True, 20)])
def test_router_picks_the_twins_experts_with_its_weights(kernels, norm, T):
    g = torch.Generator().manual_seed(1)
    h, gate = torch.randn(T, 96, generator=g), torch.randn(20, 96, generator=g)     # T > 16: logits by one GEMM
    idx, w = fused_moe.route_topk(h, gate, 6, norm, 2.5)
    ref_idx, ref_w = twin(fused_moe.route_topk, h, gate, 6, norm, 2.5)
    order, ref_order = idx.argsort(-1), ref_idx.argsort(-1)
    assert torch.equal(idx.gather(1, order), ref_idx.gather(1, ref_order))
    assert torch.allclose(w.gather(1, order), ref_w.gather(1, ref_order), rtol=1e-5, atol=1e-7)
    assert torch.allclose(w.sum(-1), torch.ones(T)) == norm


@pytest.mark.parametrize("T", [1, 5, 16])
def test_grouping_is_the_stable_sort_of_the_picks(kernels, T):
    idx = torch.randint(0, 20, (T, 6), generator=torch.Generator().manual_seed(T))
    got, ref = fused_moe.group_by_expert(idx, 20), twin(fused_moe.group_by_expert, idx, 20)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    counts = torch.bincount(idx.reshape(-1), minlength=20)
    assert ref.bounds.diff().tolist() == counts.tolist()
    assert (counts[ref.active[:int((counts > 0).sum())].long()] > 0).all()


def test_combine_weights_and_sums_each_tokens_picks(kernels):
    T, K, Hd = 4, 6, 80
    y, w = torch.randn(T * K, Hd), torch.rand(T, K)
    rank = torch.randperm(T * K).view(T, K).to(torch.int32)
    got = fused_moe.combine(y, rank, w)
    assert rel_err(got, twin(fused_moe.combine, y, rank, w)) <= 1e-6
    assert rel_err(got, (y[rank.long()] * w[..., None]).sum(1)) <= 1e-6


def test_a_forward_through_the_kernels_gives_the_twins_tokens(tiny, monkeypatch):
    e = make(tiny)
    params = SamplingParams(max_new_tokens=4, stop_on_eos=False)
    ref, ref_logits = e.generate(PROMPTS, params), e.logits(PROMPTS[0])
    monkeypatch.setattr(fused, "on_triton", lambda t: True)
    assert e.generate(PROMPTS, params).tokens == ref.tokens
    assert rel_err(e.logits(PROMPTS[0]), ref_logits) <= 1e-5


def test_host_reads_load_the_layout_and_merge_the_cpu_rows_as_the_twins(kernels):
    """kernels/host_read.py: what a decode layer's graphs read from page-locked host memory (here plain CPU
    tensors in Triton's interpreter)."""
    from hybrid.kernels import host_read
    src = torch.randint(-5, 1000, (2 * 1024 + 7,), dtype=torch.int32)
    dst = torch.zeros_like(src)
    host_read.load(dst, src)
    assert torch.equal(dst, src)
    R, Hd = 12, 1030                                       # a second column block, partly masked
    for start in (0, 7, R):
        ys, rows = torch.randn(R, Hd), torch.randn(R, Hd)
        ref = ys.clone()
        twin(host_read.merge_rows, ref, rows, torch.tensor([start], dtype=torch.int32))
        host_read.merge_rows(ys, rows, torch.tensor([start], dtype=torch.int32))
        assert torch.equal(ys, ref) and torch.equal(ys[start:], rows[:R - start])


def test_hybrid_decode_through_the_kernels_gives_the_twins_tokens(tiny, monkeypatch):
    """Mode hybrid with a small cache (guesses, slot lookups, layouts and CPU rows read from host memory), after a
    prefill of more tokens than decode's path takes (its layout read from host memory too)."""
    from conftest import budget_for
    e = make(tiny, mode="hybrid", prefetch="gate", gpu_memory=budget_for(tiny, 30))
    params = SamplingParams(max_new_tokens=6, stop_on_eos=False)
    prompt = [PROMPTS[0] + PROMPTS[2] + PROMPTS[0]]                                  # 31 tokens
    ref = e.generate(prompt, params)
    monkeypatch.setattr(fused, "on_triton", lambda t: True)
    out = e.generate(prompt, params)
    assert out.tokens == ref.tokens and out.stats.experts.cpu_experts > 0


@pytest.mark.parametrize("groups", [1, 8])
def test_gemv_experts_match_the_grouped_ffn(groups):
    """The bf16 decode path's matrix-vector kernels (float32 here): empty slots, several rows in a slot, a reduction
    (64) shorter than one step of 8 groups."""
    from hybrid.kernels.gemv_ffn import gemv_grouped_ffn
    from hybrid.model.deepseek import gated_ffn
    I, H, counts = 64, 256, torch.tensor([2, 0, 3, 0, 1])
    offs = counts.cumsum(0).to(torch.int32)
    slots = torch.randn(5, 3 * I * H) * .1
    xs = torch.randn(int(counts.sum()), H)
    bounds = [0] + offs.tolist()
    ref = torch.cat([gated_ffn(xs[a:b], slots[s, :2 * I * H].view(2 * I, H), slots[s, 2 * I * H:].view(H, I))
                     for s, (a, b) in enumerate(zip(bounds, bounds[1:]))])
    assert rel_err(gemv_grouped_ffn(xs, offs, slots, bn=16, groups=groups), ref) <= 1e-5


def test_upload_ring_returns_each_array_and_reuses_its_slots_in_turn():
    import numpy as np
    from hybrid.kernels.host_read import UploadRing
    ring = UploadRing(torch.device("cpu"), capacity=4, slots=3)
    got = [ring(np.arange(i, i + 1 + i % 4, dtype=np.int32)) for i in range(7)]
    for i in (4, 5, 6):                          # the last `slots` uploads still stand, each in its own slot
        assert got[i].tolist() == list(range(i, i + 1 + i % 4))
    assert got[6].data_ptr() == got[3].data_ptr() and ring.next == 7 % 3
    with pytest.raises(ValueError, match="do not fit"):
        ring(np.zeros(5, dtype=np.int32))

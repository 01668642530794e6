"""Every offloading mode and prefetch choice computes the same function as the resident `gpu` mode."""
import pytest
import torch

from conftest import PROMPTS, budget_for, make, rel_err
from hybrid.model.config import RunConfig
from hybrid.engine.engine import Engine
from hybrid.engine.sampling import SamplingParams

SLOTS = 20      # of 48 routed experts in the tiny model: many misses


@pytest.fixture(scope="module")
def gpu_run(tiny):
    e = make(tiny)
    return e.generate(PROMPTS, SamplingParams(max_new_tokens=10, stop_on_eos=False)), e.logits(PROMPTS[0])


@pytest.mark.parametrize("mode", ["fetch", "cpu", "hybrid"])
@pytest.mark.parametrize("prefetch", ["none", "gate"])
@pytest.mark.parametrize("layout", ["spread", "layers"])
def test_mode_matches_gpu_mode(tiny, gpu_run, mode, prefetch, layout):
    ref, ref_logits = gpu_run
    e = make(tiny, mode=mode, prefetch=prefetch, gpu_memory=budget_for(tiny, SLOTS), cache_layout=layout)
    assert e.backend.cache.n_slots == SLOTS and e.backend.cpu.experts.kind == "native"
    batch3 = e.generate(PROMPTS, SamplingParams(max_new_tokens=10, stop_on_eos=False))
    assert batch3.tokens == ref.tokens
    one = e.generate(PROMPTS[:1], SamplingParams(max_new_tokens=10, stop_on_eos=False))
    assert one.tokens == ref.tokens[:1]
    assert rel_err(e.logits(PROMPTS[0]), ref_logits) <= 1e-4
    x = batch3.stats.experts
    assert x.misses > 0 and 0 < x.hit_rate < 1
    if mode == "cpu":
        assert x.cpu_experts == x.misses and (x.fetched == 0) == (prefetch == "none")
    if mode == "fetch":
        assert x.cpu_experts == 0 and x.fetched >= x.misses
    if prefetch == "gate":
        assert x.prefetched > 0 and x.prefetch_recall > 6 / 16


@pytest.mark.parametrize("policy", ["lru", "static"])
def test_policies_are_exact_and_static_never_fetches_into_the_cache(tiny, gpu_run, policy):
    e = make(tiny, mode="fetch", cache_policy=policy, gpu_memory=budget_for(tiny, SLOTS))
    before = {layer: e.backend.cache.cached(layer) for layer in e.cfg.moe_layers}
    out = e.generate(PROMPTS, SamplingParams(max_new_tokens=10, stop_on_eos=False))
    assert out.tokens == gpu_run[0].tokens
    after = {layer: e.backend.cache.cached(layer) for layer in e.cfg.moe_layers}
    assert (before == after) == (policy == "static")


def test_hybrid_records_predicted_and_measured_layer_times(tiny):
    e = make(tiny, mode="hybrid", gpu_memory=budget_for(tiny, SLOTS))
    s = e.generate(PROMPTS, SamplingParams(max_new_tokens=4)).stats
    assert len(s.layer_pred_ms) == len(s.layer_meas_ms) > 0
    assert all(m > 0 for m in s.layer_meas_ms) and "layer_time_median_rel_err" in s.summary()
    fb = e.backend.feedback
    assert fb.scale and all(0.4 <= v <= 2.5 for v in fb.scale.values())
    from hybrid.planning.lane_feedback import LAG_CAP_MS, PREFILL_LAG_CAP_MS
    caps = {T: LAG_CAP_MS if T <= fb.decode_tokens else PREFILL_LAG_CAP_MS for T in fb.lag}
    assert fb.lag and all(-caps[T] <= v <= caps[T] for T, v in fb.lag.items())     # decode / prefill caps
    assert fb.lag[len(PROMPTS)] >= 0         # decode: the copies are issued before the pool starts the CPU lane
    assert all(v < 0 for T, v in fb.lag.items() if T > fb.decode_tokens)    # prefill: the CPU lane starts first


def test_gpu_mode_refuses_a_budget_that_cannot_hold_every_expert(tiny):
    from hybrid.offload.budget import BudgetError
    with pytest.raises(BudgetError, match="mode gpu keeps every expert resident"):
        make(tiny, gpu_memory=budget_for(tiny, SLOTS))


def test_hybrid_uses_both_layer_paths_and_stays_exact(tiny, gpu_run, monkeypatch):
    """Decode layers take the fixed-shape path (hits GEMM, fetched GEMM, CPU rows, one combine); prefill layers
    take the general path (one GEMM per wave of fetches). Both must match the reference."""
    e = make(tiny, mode="hybrid", gpu_memory=budget_for(tiny, 4))
    plans, plan = [], e.backend.planner.plan
    monkeypatch.setattr(e.backend.planner, "plan", lambda *a: plans.append(plan(*a)) or plans[-1])
    out = e.generate(PROMPTS, SamplingParams(max_new_tokens=10, stop_on_eos=False))
    assert out.tokens == gpu_run[0].tokens and out.stats.experts.cpu_experts > 0
    assert any(p.one_wave for p in plans)                                   # decode's fixed-shape path
    assert any(len(p.waves) > 1 for p in plans)                             # prefill: a GEMM per wave


def test_fetch_modes_predictions_do_not_grow_with_the_run(tiny):
    """Copies faster than the cost model (a model of 20 ms per copy; on CPU they land at once) leave no backlog:
    each layer's prediction is its own copies', however long the run (session 8's fetch-mode sweep predicted 65 ms
    per layer against 10.9 measured, more the longer the run)."""
    e = make(tiny, mode="fetch", gpu_memory=budget_for(tiny, 4))
    e.backend.planner.costs.fetch_ms = e.backend.copies.fetch_ms = 20.0
    out = e.generate(PROMPTS[:1], SamplingParams(max_new_tokens=32, stop_on_eos=False))
    pred = out.stats.layer_pred_ms
    assert len(pred) > 32 and max(pred) <= e.cfg.n_routed_experts * 20.0 + 5.0
    assert e.backend.copies.backlog_ms() == 0.0


def test_tile_path_runs_prefill_experts_on_the_pool_and_matches_torch(tiny, monkeypatch):
    """bf16 prefill puts more than 8 tokens on CPU experts: with the kernel's tile path (emulated here; AMX on
    the GPU box) the pool takes them as the layer starts, and the logits match torch's CPU path."""
    from hybrid.kernels.cpu_experts import CpuExperts
    took, orig = [], CpuExperts.start_rows

    def spy(self, x, rows, out, views, ptrs, segs):
        ok = orig(self, x, rows, out, views, ptrs, segs)
        took.append((ok, max(c for _, _, c in segs), self.label))
        return ok
    monkeypatch.setattr(CpuExperts, "start_rows", spy)
    prompt = [(37 * i) % 5000 + 10 for i in range(64)]              # 64 tokens x top-4 of 16: ~16 per expert
    logits = {}
    for tiles in ("emulate", "off"):
        run = RunConfig(dtype="bfloat16", mode="cpu", max_seq_len=80, cache_slots=0, cpu_tiles=tiles)
        logits[tiles] = Engine(str(tiny), run, progress=False).logits(prompt).float()
    assert rel_err(logits["emulate"], logits["off"]) <= 2e-2
    assert any(ok and big > 8 and "+amxemu" in label for ok, big, label in took)
    assert not any(ok and big > 8 for ok, big, label in took if "+amxemu" not in label)


@pytest.mark.parametrize("experts", ["bf16", "q4"])
def test_dot_path_runs_decode_experts_and_gives_the_plain_paths_tokens(wide128, experts, monkeypatch):
    """bf16 decode puts 1-token experts on the CPU: with the kernel's dot-product path (emulated here; AVX512-BF16
    on the GPU box) their jobs take its activation layouts, and the greedy tokens are the plain path's."""
    from hybrid.kernels.cpu_experts import CpuExperts
    took, orig = [], CpuExperts._args

    def spy(self, *a, **kw):
        args, keep = orig(self, *a, **kw)
        took.append(self.lib.moe_dot_layouts(*(args[i] for i in (0, 1, 9, 10, 11, 15, 16, 17))))
        return args, keep
    monkeypatch.setattr(CpuExperts, "_args", spy)
    tokens = {}
    for dot in ("emulate", "off"):
        run = RunConfig(dtype="bfloat16", mode="cpu", experts=experts, max_seq_len=48, cache_slots=0, cpu_dot=dot)
        first = len(took)
        out = Engine(str(wide128), run, progress=False).generate([[1, 17, 400, 23, 99, 5, 77, 300]],
                                                                    SamplingParams(max_new_tokens=6, stop_on_eos=False))
        tokens[dot] = out.tokens
        assert len(took) > first and any(took[first:]) == (dot == "emulate")
    assert tokens["emulate"] == tokens["off"]


@pytest.mark.parametrize("mode", ["gpu", "hybrid"])
def test_repeated_prompt_shapes_prefill_from_static_buffers_exactly(tiny, mode):
    kw = {"gpu_memory": budget_for(tiny, SLOTS)} if mode != "gpu" else {}
    e = make(tiny, mode=mode, prefill_graph_tokens=12, **kw)
    params = SamplingParams(max_new_tokens=6, stop_on_eos=False)
    runs = [e.generate(PROMPTS[:1], params).tokens for _ in range(3)]
    assert runs[0] == runs[1] == runs[2] and list(e.prefiller.steps) == [(1, 12)]
    e.generate([PROMPTS[0] + [7]], params)                        # 13 tokens: over the limit, eager
    e.generate([PROMPTS[0] + [7]], params)
    e.generate(PROMPTS, params)                                   # padded batch: eager
    assert list(e.prefiller.steps) == [(1, 12)]
    ids = torch.tensor([PROMPTS[0]])
    st = e.step_state(ids > -1, ids.new_zeros(1), 0, 12)
    eager = e.model.forward(ids, e.cache.batch(1), st)
    static = e.prefiller(ids, st.positions, st.mask)
    if mode == "gpu":
        assert torch.equal(static, eager)
    else:       # which lane runs an expert changes as the cache fills (native CPU kernel vs grouped GEMM)
        assert rel_err(static, eager) <= 1e-5


def test_decode_takes_the_guess_where_the_table_covers_every_pick_and_stays_exact(tiny, gpu_run):
    """Batch-1 decode layers whose picks are all in the slot table take the output guessed before the routing
    sync (guesses.py); the others run the plan. Under the spread layout (no layer pinned, every layer planned or
    guessed), every expert cached: nearly all decode layers guess; 36 of 48:
    some (which ones the CPU lane keeps out of the cache varies with its timing); with gate prefetch too (its
    copies enter the table before they land); batch 3 (more picks than GUESS_TOKENS): none. The tokens equal mode
    gpu's."""
    from hybrid.offload.guesses import GUESS_TOKENS
    ref = gpu_run[0].tokens
    params = SamplingParams(max_new_tokens=10, stop_on_eos=False)
    shares = []
    for slots, prompts, prefetch in ((48, PROMPTS[:1], "none"), (36, PROMPTS[:1], "none"),
                                     (48, PROMPTS, "none"), (36, PROMPTS[:1], "gate")):
        e = make(tiny, mode="hybrid", prefetch=prefetch, gpu_memory=budget_for(tiny, slots), cache_layout="spread")
        out = e.generate(prompts, params)
        assert out.tokens == ref[:len(prompts)] and out.stats.experts.pinned_layers == 0
        shares.append(out.stats.summary()["guessed_layer_share"])
    assert len(PROMPTS) > GUESS_TOKENS and shares[2] == 0
    assert shares[0] >= 0.8 and 0 < shares[1] <= shares[0] and 0 < shares[3] <= shares[0]


def test_the_predicted_layer_time_carries_the_learned_residual(tiny):
    """The first planned layer is predicted by the cost model alone; later ones add the running residual of the
    layers measured so far (LaneFeedback.bias_ms); both errors are reported."""
    e = make(tiny, mode="hybrid", gpu_memory=budget_for(tiny, 24))
    out = e.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, stop_on_eos=False))
    pred, model = out.stats.layer_pred_ms, out.stats.layer_model_ms
    assert len(pred) == len(model) == len(out.stats.layer_meas_ms) > 2 and pred[0] == model[0]
    assert any(p != m for p, m in zip(pred, model))
    s = out.stats.summary()
    assert s["layer_time_median_rel_err"] is not None and s["layer_time_median_rel_err_model"] is not None

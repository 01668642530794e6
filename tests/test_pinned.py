"""The `layers` cache layout: whole shares for the last MoE layers, which run without the host (offload/pinned.py)."""
import pytest
import torch

from conftest import PROMPTS, budget_for, make
from hybrid.engine.sampling import SamplingParams
from hybrid.offload.expert_cache import layer_shares
from hybrid.offload.pinned import PinnedLayers, tally


def test_auto_layout_is_whole_layers_at_batch_1_only():
    from hybrid.model.config import RunConfig
    from hybrid.offload.runtime import cache_layout
    assert cache_layout(RunConfig(max_batch_size=1)) == "layers"
    assert cache_layout(RunConfig(max_batch_size=2)) == "spread"
    assert cache_layout(RunConfig(max_batch_size=2, cache_layout="layers")) == "layers"


def test_auto_prefetch_is_gate_in_hybrid_at_batch_1_only():
    from hybrid.model.config import RunConfig
    from hybrid.offload.runtime import prefetch_kind
    assert RunConfig().prefetch == "auto"
    assert prefetch_kind(RunConfig(mode="hybrid", max_batch_size=1)) == "gate"
    assert prefetch_kind(RunConfig(mode="hybrid", max_batch_size=2)) == "none"
    assert prefetch_kind(RunConfig(mode="fetch", max_batch_size=1)) == "none"
    assert prefetch_kind(RunConfig(mode="hybrid", max_batch_size=4, prefetch="gate")) == "gate"
    assert prefetch_kind(RunConfig(mode="hybrid", max_batch_size=1, prefetch="none")) == "none"


def test_the_start_message_names_the_layout_and_the_prefetch_auto_chose(tiny, capsys):
    from hybrid.engine.engine import Engine
    from hybrid.model.config import RunConfig
    Engine(str(tiny), RunConfig(dtype="float32", mode="hybrid", max_batch_size=1, max_seq_len=32), progress=True)
    err = capsys.readouterr().err
    assert "cache layout layers" in err and "prefetch gate" in err


def test_layer_shares_give_whole_layers_from_the_last_or_equal_shares():
    assert layer_shares(4, 9, 4, "layers") == [0, 1, 4, 4]
    assert layer_shares(4, 8, 4, "layers") == [0, 0, 4, 4]
    assert layer_shares(4, 3, 4, "layers") == [0, 0, 0, 3]
    assert layer_shares(4, 16, 4, "layers") == [4, 4, 4, 4]
    assert layer_shares(4, 9, 4, "spread") == [3, 2, 2, 2]
    with pytest.raises(ValueError, match="layers or spread"):
        layer_shares(4, 9, 4, "rows")


@pytest.fixture(scope="module")
def reference(tiny):
    return make(tiny).generate(PROMPTS, SamplingParams(max_new_tokens=8, stop_on_eos=False)).tokens


@pytest.mark.parametrize("mode", ["fetch", "hybrid"])
def test_pinned_layers_skip_the_routing_sync_and_count_what_they_served(tiny, reference, monkeypatch, mode):
    """20 of 48 slots: the last MoE layer is whole (pinned), the one before has 4, the first none. The pinned
    layer never reaches the host's routing sync; its distinct experts per call are tallied on the device and
    counted as hits; the tokens equal mode gpu's."""
    e = make(tiny, mode=mode, gpu_memory=budget_for(tiny, 20), cache_layout="layers")
    first, middle, last = e.cfg.moe_layers
    cache = e.backend.cache
    assert e.backend.pinned.layers == {last} and not cache.pinned(middle)
    assert [len(cache.layer_slots[x]) for x in (first, middle, last)] == [0, 4, 16]
    synced, distinct = [], []
    take, forward = e.backend.routing.take, PinnedLayers.forward

    def take_spy(call, *a):
        synced.append(call.layer)
        return take(call, *a)

    def forward_spy(self, call, count=True):
        distinct.append(len(set(call.idx.reshape(-1).tolist())))
        return forward(self, call, count)
    monkeypatch.setattr(e.backend.routing, "take", take_spy)
    monkeypatch.setattr(PinnedLayers, "forward", forward_spy)
    out = e.generate(PROMPTS, SamplingParams(max_new_tokens=8, stop_on_eos=False))
    assert out.tokens == reference
    x = out.stats.experts
    assert last not in synced and synced.count(first) == len(distinct) > 1
    assert x.pinned_layers == len(distinct) and x.layers == 3 * len(distinct)
    assert x.per_layer_hits[last] == sum(distinct) and x.per_layer_misses[last] == 0
    assert out.stats.summary()["pinned_layer_share"] == pytest.approx(1 / 3)


def test_every_layer_whole_runs_offloading_modes_as_mode_gpu(tiny, reference):
    e = make(tiny, mode="hybrid", gpu_memory=budget_for(tiny, 48), cache_layout="layers")
    out = e.generate(PROMPTS, SamplingParams(max_new_tokens=8, stop_on_eos=False))
    assert out.tokens == reference
    x = out.stats.experts
    assert x.pinned_layers == x.layers > 0 and x.misses == 0 and x.fetched == 0 and x.cpu_experts == 0


def test_the_tally_kernel_counts_as_the_torch_path_does(monkeypatch):
    """On a GPU the tally is one Triton kernel (here in Triton's interpreter), blocks of 128 picks."""
    from hybrid.model import fused
    if fused.triton is None:
        pytest.skip("Triton is not installed")
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 40, (75, 6), generator=g)                 # 450 picks: four blocks
    idx[:, 0] = 3
    want = torch.zeros(2, dtype=torch.int32)
    tally(idx, want, 48)
    tally(idx[:2], want, 48)
    got = torch.zeros(2, dtype=torch.int32)
    monkeypatch.setattr(fused, "on_triton", lambda t: True)
    tally(idx, got, 48)
    tally(idx[:2], got, 48)
    distinct = len(set(idx.reshape(-1).tolist())) + len(set(idx[:2].reshape(-1).tolist()))
    assert got.tolist() == want.tolist() == [distinct, 2]


def test_gate_prefetch_for_a_layer_with_no_share_goes_to_held_staging_slots(tiny, reference, monkeypatch):
    """16 of 48 slots: the last MoE layer whole, the others none. The first layer's prefetch for the second copies
    into staging slots held until the second plans (as prefill's copies made ahead); exact, and used."""
    e = make(tiny, mode="hybrid", prefetch="gate", gpu_memory=budget_for(tiny, 16), cache_layout="layers")
    first, middle, last = e.cfg.moe_layers
    assert [len(e.backend.cache.layer_slots[x]) for x in (first, middle, last)] == [0, 0, 16]
    held = []
    hold = e.backend.cache.hold
    monkeypatch.setattr(e.backend.cache, "hold", lambda s: (held.append(s), hold(s)))
    out = e.generate(PROMPTS[:1], SamplingParams(max_new_tokens=8, stop_on_eos=False))
    assert out.tokens == reference[:1]
    x = out.stats.experts
    assert x.prefetched > 0 and x.prefetch_used > 0 and x.copied_ahead_used >= x.prefetch_used
    assert held and all(e.backend.cache.is_staging(s) for s in held) and e.backend.cache.held_count == 0


def test_a_decode_wave_never_counts_held_staging_slots_as_room(tiny, monkeypatch):
    """Mode fetch copies every miss: one decode wave where they fit the staging room, and slots held by the
    previous layer's prefetch are not room (else two copies of one wave shared a slot). Copies nearly free in the
    cost model: the prefetch copies all it guesses."""
    import hybrid.offload.runtime as runtime
    from cost_model.costs import CostModel
    cheap = CostModel.defaults()
    cheap.fetch_ms = 0.001
    monkeypatch.setattr(runtime, "load_costs", lambda *a: (cheap, "copies nearly free"))
    prompts = PROMPTS + [p[::-1] for p in PROMPTS]               # 6 x 4 picks: more than the 12 staging slots
    ref = make(tiny, max_batch_size=6).generate(prompts, SamplingParams(max_new_tokens=8, stop_on_eos=False)).tokens
    e = make(tiny, mode="fetch", prefetch="gate", cache_slots=16, max_batch_size=6, cache_layout="layers")
    out = e.generate(prompts, SamplingParams(max_new_tokens=8, stop_on_eos=False))
    assert out.tokens == ref and out.stats.experts.copied_ahead > 0 and out.stats.experts.fetched > 0


def test_the_phase_log_times_planned_layers_and_skips_whole_ones(tiny):
    """The phase log (eval/probes/profile_layers.py) records every planned layer's spans, the CPU lane's among
    them, and none for a whole layer."""
    e = make(tiny, mode="hybrid", gpu_memory=budget_for(tiny, 20), cache_layout="layers")
    log = e.backend.phases
    log.enabled = True
    e.generate(PROMPTS[:1], SamplingParams(max_new_tokens=6, stop_on_eos=False))
    last = e.cfg.moe_layers[-1]
    assert log.rows and all(r["layer"] != last for r in log.rows)
    s = log.summary()
    assert s["layers_logged"] == len(log.rows) and s["routed->planned"]["mean_ms"] >= 0
    spans = [k for k in s if "->" in k]
    assert "planned->graph" in spans and "routed->cpu_start" in spans and "routed->cpu_end" in spans and s["cpu_ms_by_experts"]
    both = [r for r in log.rows if "issued" in r and "cpu_start" in r]       # decode: copies out before the CPU lane
    assert both and all(r["issued"] <= r["cpu_start"] for r in both)
    assert s["backlog_ms"]["layers"] > 0 and s["backlog_ms"]["max_ms"] >= s["backlog_ms"]["mean_ms"] >= 0
    assert s["cpu_lane_ms"]["layers"] > 0 and s["cpu_lane_ms"]["p50_ms"] > 0       # the pool's own time
    assert 0.4 <= s["cpu_scale"]["p50"] <= 2.5 and 0 < s["room"]["layers"] < s["backlog_ms"]["layers"]  # decode's room

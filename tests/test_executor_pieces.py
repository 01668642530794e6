"""The executor's pieces without an Engine: the PCIe lane in experts and slots, the deferred accounting and the
layer timer, on a small config with a fake store (CPU: copies are synchronous, events are None)."""
from types import SimpleNamespace

import pytest
import torch

from cost_model.costs import CostModel
from hybrid.offload.accounting import Accounting, LayerOutcome
from hybrid.model.config import ModelConfig
from hybrid.offload.expert_cache import ExpertCache
from hybrid.offload.expert_copies import ExpertCopies
from hybrid.planning.lane_feedback import LaneFeedback
from hybrid.offload.lanes import CopyLane
from hybrid.offload.layer_timer import LayerTimer
from hybrid.offload.stats import RunStats
from hybrid.model.synthetic import PRESETS

CFG = ModelConfig.from_dict(PRESETS["tiny"][0])         # 3 MoE layers x 16 experts


def fake_store():
    """Expert e of layer L holds the value 1000 * L + e everywhere."""
    flat = torch.stack([torch.stack([torch.full((CFG.expert_numel,), 1000.0 * L + e)
                                     for e in range(CFG.n_routed_experts)]) for L in CFG.moe_layers])
    return SimpleNamespace(flat=flat, numel=CFG.expert_numel, expert_bytes=CFG.expert_numel * 4,
                           nbytes_of=lambda layer: CFG.expert_numel * 4, size_ratio=lambda layer: 1.0,
                           buffers={L: list(flat[r].unbind(0)) for r, L in enumerate(CFG.moe_layers)})


def pieces(slots=6, staging=3):
    cache = ExpertCache(CFG, slots, staging, torch.float32, "cpu", "lru")
    costs = CostModel.defaults()
    acct = Accounting(CFG.moe_layers[0], cache, None, LaneFeedback(), costs)
    acct.stats = RunStats("hybrid", 1, 1, "cpu")
    return cache, acct, ExpertCopies(CopyLane(torch.device("cpu")), cache, fake_store(), acct, costs.fetch_ms)


def test_copies_land_in_their_slots_and_are_counted():
    import time
    cache, acct, copies = pieces()
    layer = CFG.moe_layers[0]
    before = time.perf_counter()
    wave = copies.admit_and_issue(layer, [3, 7], {3: 1, 7: 2})
    assert [e for e, _ in wave] == [3, 7] and {cache.slot_of(layer, e) for e in (3, 7)} == {s for _, s in wave}
    for e, s in wave:
        assert torch.all(cache.view(s) == 1000.0 * layer + e)
    x = acct.stats.experts
    assert x.fetched == 2 and x.fetched_bytes == 2 * CFG.expert_numel * 4
    assert before + copies.fetch_ms / 1000 <= copies.until <= time.perf_counter() + 2 * copies.fetch_ms / 1000
    assert copies.backlog_ms() == 0.0        # the model's clock ran ahead, but the copies landed (on CPU, at once)


def test_copies_issued_through_a_driver_call_move_each_experts_bytes_into_its_slot():
    """The GPU's copy path (driver_copy.py) on the CPU: the same (dst, src, bytes) calls, made by memmove; a slot
    larger than its expert keeps its tail; a failed call raises, naming the driver's error."""
    import ctypes
    from hybrid.offload.driver_copy import DriverCopy
    calls = []

    def memmove(dst, src, n, stream):
        calls.append((n, stream))
        ctypes.memmove(dst, src, n)
        return 0
    cache, acct, copies = pieces()
    copies.lane = CopyLane(torch.device("cpu"), driver=DriverCopy(memmove))
    layer = CFG.moe_layers[1]
    for slot in range(cache.n_total):
        cache.view(slot).fill_(-1.0)
    short = copies.store.buffers[layer][5][: CFG.expert_numel // 2]       # a layer whose experts are smaller
    copies.store.buffers[layer][5] = short
    wave = copies.admit_and_issue(layer, [4, 5], {4: 1, 5: 1})
    assert calls == [(CFG.expert_numel * 4, 0), (CFG.expert_numel * 2, 0)]
    for e, s in wave:
        n = copies.store.buffers[layer][e].numel()
        assert torch.all(cache.view(s)[:n] == 1000.0 * layer + e) and torch.all(cache.view(s)[n:] == -1.0)
    with pytest.raises(RuntimeError, match="driver error 700"):
        DriverCopy(lambda *a: 700)(0, [(0, 0, 8)])
    assert DriverCopy.load() is None or callable(DriverCopy.load().fn)


def test_the_lanes_clock_follows_the_model_until_the_last_copy_lands():
    """The modelled backlog stands while the last wave is in flight and drops to none once it has landed, so
    copies faster than the model leave no backlog that grows with the run."""
    import time
    cache, acct, copies = pieces()
    pending = {"done": False}
    copies.lane = SimpleNamespace(copy_many=lambda pairs, after: "event",
                                  done=lambda ev: ev is None or pending["done"])
    copies.fetch_ms = 50.0                                             # the model far slower than this test's steps
    layer = CFG.moe_layers[0]
    for e in range(3):                                                 # three waves of one copy, back to back
        copies.issue(layer, [(e, copies.slot_for(layer, e, {}))])
    assert copies.backlog_ms() > 2 * copies.fetch_ms                   # in flight: the model's three copies
    start = time.perf_counter()
    pending["done"] = True
    assert copies.backlog_ms() == 0.0 and start <= copies.clock() <= time.perf_counter()
    pending["done"] = False
    copies.issue(layer, [(3, copies.slot_for(layer, 3, {}))])          # the next wave's model starts from now
    assert 0.5 * copies.fetch_ms <= copies.backlog_ms() <= copies.fetch_ms


def test_a_full_share_sends_copies_to_staging_and_holds_release_slots():
    cache, acct, copies = pieces(slots=3, staging=3)                          # one slot per layer
    layer = CFG.moe_layers[1]
    protected = {1: 1, 2: 1}
    first, second = copies.slot_for(layer, 1, protected), copies.slot_for(layer, 2, protected)
    assert not cache.is_staging(first) and cache.is_staging(second)          # 1 is protected: 2 goes to staging
    copies.issue(layer, [(2, second)])
    assert torch.all(cache.view(second) == 1000.0 * layer + 2)
    cache.hold(second)
    assert cache.held_count == 1
    copies.read_queued([(2, second)])                                          # read by queued work: released
    assert cache.held_count == 0
    copies.wait_landed([(2, second)])                                          # nothing pending on the CPU


def test_accounting_settles_the_previous_layer_once():
    cache, acct, _ = pieces()
    layer = CFG.moe_layers[0]
    acct.defer(LayerOutcome(layer, {1: 2, 5: 1, 9: 1}, hits=2, fetched=1, cpu=1, ahead_used=1))
    acct.cpu_call(tokens=1, ms=0.5, rows=[1])
    acct.settle()
    acct.settle()                                                              # nothing pending: no double count
    x = acct.stats.experts
    assert (x.hits, x.misses, x.cpu_experts, x.copied_ahead_used) == (1, 3, 1, 1)
    assert x.per_layer_misses == {layer: 3} and x.cpu_busy_s == 0.0005
    assert acct.cpu_sample is None and acct.feedback.scale                    # fed back to the planner


def test_layer_timer_pairs_marks_with_predictions_and_hands_finished_spans_over_once():
    timer = LayerTimer(cuda=False)
    start = timer.mark()
    timer.span(start, 0.7, 0.5, tokens=3)
    (tokens, ms, model), = timer.finished()
    assert tokens == 3 and model == 0.5 and ms >= 0 and timer.finished() == []
    timer.span(timer.mark(), 0.2)                                   # no model figure: the prediction stands for it
    measured, predicted, models = timer.read()
    assert predicted == [0.7, 0.2] and models == [0.5, 0.2] and len(measured) == 2 and min(measured) >= 0
    assert [s[0] for s in timer.finished()] == [0]
    timer.rewind()
    assert timer.read() == ([], [], []) and timer.finished() == []


def test_the_layer_time_correction_follows_the_residual_within_its_cap():
    from hybrid.planning.lane_feedback import BIAS_CAP_MS
    fb = LaneFeedback(decode_tokens=16)
    assert fb.bias_ms(1) == 0.0
    for _ in range(60):
        fb.note_layer(1, 0.5, 0.4)
    assert abs(fb.bias_ms(1) - 0.1) < 1e-3 and abs(fb.bias_ms(2) - 0.1) < 1e-3    # a new decode size borrows it
    assert fb.bias_ms(512) == 0.0                                                  # prefill learns its own
    for _ in range(200):
        fb.note_layer(1, 100.0, 0.4)
    assert abs(fb.bias_ms(1) - BIAS_CAP_MS[0]) < 1e-3


def test_the_next_layers_part_of_a_plan_and_its_copies():
    import numpy as np
    from hybrid.planning.copy_ahead import CopyAhead
    from hybrid.offload.next_layer import NextLayerCopies
    from hybrid.planning.prefetch import Prefetcher
    cache, acct, copies = pieces(slots=9, staging=6)
    first, nxt = CFG.moe_layers[:2]
    cache.place(nxt, 4)                                             # one of the guesses is cached already
    ahead = CopyAhead(copies.fetch_ms, 2)
    ahead.observe(10 * copies.fetch_ms)                             # a gap of many copies: capped at 2
    nl = NextLayerCopies(CFG.moe_layers, CFG.n_routed_experts, cache, copies, acct, CostModel.defaults(),
                         Prefetcher(CFG), ahead)
    guess = np.array([[4, 9], [9, 2]])                              # next layer's experts guessed per token
    prefetch = nl.choose_prefetch(first, guess)
    assert prefetch == [9, 2] and nl.choose_ahead(first, guess, prefill=False) == []   # uncached, most-voted first
    assert nl.choose_ahead(first, guess, prefill=True)[:2] == [9, 2]                   # guessed ones first
    last = CFG.moe_layers[-1]
    assert nl.choose_prefetch(last, guess) == [] and nl.choose_ahead(last, guess, True) == []   # no next layer
    nl.prefetch(first, guess, prefetch, window_ms=10.0)
    assert cache.residents(nxt) >= {9, 2} and acct.stats.experts.prefetched == 2
    chosen = nl.choose_ahead(first, guess, prefill=True)
    assert len(chosen) == 2 and not set(chosen) & {9, 2, 4}         # skips what the prefetch admitted
    layer, wave = nl.copy_ahead(first, [5, 6])
    assert layer == nxt and all(cache.is_staging(s) for _, s in wave) and cache.held_count == 2
    assert nl.take_ahead(nxt, {5: 1}, prefill=True) == {5: wave[0][1]} and cache.held_count == 1


def test_the_slot_table_holds_only_landed_experts():
    """A slot enters the table once the stream has waited for its copy (`landed`) and leaves it as soon as it is
    reused (eviction); the lookup a guess makes reads it as it is then, 0 for experts without a slot."""
    cache, acct, copies = pieces(slots=3, staging=3)                          # one slot per layer
    layer, table = CFG.moe_layers[0], cache.table
    (e1, s1), = copies.admit_and_issue(layer, [5], {5: 1})
    assert not table.covers(layer, [5]) and table.mirror[layer, 5] == -1    # copied, not yet waited for
    cache.landed(layer, [(5, s1)])
    assert table.covers(layer, [5]) and table.lookup(layer, torch.tensor([[5, 3]])).tolist() == [[s1, 0]]
    (e2, s2), = copies.admit_and_issue(layer, [9], {9: 1})                  # evicts 5 from the layer's one slot
    assert s2 == s1 and table.mirror[layer, 5] == -1 and table.mirror[layer, 9] == -1
    cache.landed(layer, [(9, s2), (5, s1)])                                  # 5 is no longer the slot's owner
    assert not table.covers(layer, [5]) and table.covers(layer, [9])
    other = CFG.moe_layers[1]
    copies.slot_for(other, 3, {3: 1})                                        # fills its one slot
    staged = copies.slot_for(other, 2, {2: 1, 3: 1})                         # 3 is needed too: 2 goes to staging
    cache.landed(other, [(2, staged)])                                       # staging slots never enter it
    assert cache.is_staging(staged) and table.mirror[other, 2] == -1
    for row in (layer, other):                       # the host's check (a set) and the table the GPU reads agree
        assert table.held[row] == {int(e) for e in (table.mirror[row] >= 0).nonzero()[0]}


def test_the_lookup_kernel_reads_the_table_as_the_torch_path_does(monkeypatch):
    """The guess's lookup on a GPU is a Triton kernel over the page-locked table (here in Triton's interpreter).
    Ids outside the table (a capture warms a guess on a routing buffer not yet written) give 0 and read nothing."""
    from hybrid.model import fused
    from hybrid.offload.slot_table import SlotTable
    if fused.triton is None:
        pytest.skip("Triton is not installed")
    table = SlotTable(4, 16, "cpu")
    table.set(2, 3, 7)
    table.set(2, 15, 11)
    idx = torch.tensor([[3, 15, 0], [15, 4, 3], [16, -1, 2**40]])
    torch_path = table.lookup(2, idx)
    monkeypatch.setattr(fused, "on_triton", lambda t: True)
    assert torch.equal(table.lookup(2, idx), torch_path)
    assert torch_path.tolist() == [[7, 11, 0], [11, 0, 7], [0, 0, 0]]


def test_prefetched_experts_enter_the_slot_table_before_landing_and_the_guess_waits_for_their_copy(monkeypatch):
    """A prefetch's copies are in flight when the next layer's guess is launched: their entries go in at once,
    with the copy's event, and the compute stream waits for that event (only the latest: the copies share one
    stream) before a guess is queued. Staging slots and slots reused since stay out."""
    cache, acct, copies = pieces(slots=6, staging=2)
    layer, table = CFG.moe_layers[1], cache.table
    s3, s4 = cache.admit(layer, 3, set()), cache.admit(layer, 4, set())
    cache.in_flight(layer, [(3, s3), (4, s4), (7, cache.staging_slot())], "copy-event-1")
    cache.in_flight(layer, [(4, s4)], "copy-event-2")
    assert table.mirror[layer, 3] == s3 and table.mirror[layer, 4] == s4 and table.mirror[layer, 7] == -1
    waits = []

    class Stream:
        def wait_event(self, event):
            waits.append(event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    table.wait_guarded()
    assert waits == ["copy-event-2"] and table.covers(layer, [3, 4]) and table.guarded is None
    table.wait_guarded()
    assert waits == ["copy-event-2"]                                          # nothing new to wait for
    cache.in_flight(layer, [(5, s3)], "copy-event-3")                         # slot s3 is 3's, not 5's
    assert table.guarded is None and table.mirror[layer, 5] == -1


def test_every_graph_capture_warms_up_on_one_stream_per_device(monkeypatch):
    """torch keeps a cuBLAS workspace (32 MiB) for each stream that ran a matmul: with a fresh stream per capture a
    server capturing every batch size would hold up to 1 GiB of them outside its memory plan."""
    from hybrid.offload import layer_graph
    made, device = [], [0]
    monkeypatch.setattr(layer_graph, "_WARM_STREAMS", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: device[0])
    monkeypatch.setattr(torch.cuda, "Stream", lambda: made.append(object()) or made[-1])
    first = layer_graph.warm_stream()
    assert all(layer_graph.warm_stream() is first for _ in range(20)) and len(made) == 1
    device[0] = 1
    assert layer_graph.warm_stream() is not first and len(made) == 2


def test_prefill_waves_are_whole_scratch_chunks():
    """A wave of 9 through an 8-expert scratch ran as chunks of 8 and 1, each launched from the host."""
    from hybrid.offload.wave_groups import WaveGroups
    chunked = WaveGroups(None, None, SimpleNamespace(chunk=8), None)
    assert [chunked.wave_size(s) for s in (18, 16, 14, 40, 1, 0)] == [8, 8, 7, 16, 1, 1]
    plain = WaveGroups(None, None, None, None)
    assert [plain.wave_size(s) for s in (18, 40, 1)] == [9, 20, 1]


def test_a_static_steps_layers_share_one_set_of_layer_graphs_captured_only_with_graphs_on():
    """Calls over one step's buffers (graphs.StaticStep._shared) get one LayerGraph per expert layout, whatever the
    layer; calls from elsewhere one each; with --cuda-graphs off nothing is captured, even on a GPU."""
    from hybrid.offload.layer_graph import LayerGraphs

    class Ffn:
        def __call__(self, layer):
            return None

        def layout_of(self, layer):
            return "q5" if layer == 3 else "q4"
    x, idx, w = torch.zeros(2, 8), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)
    call = lambda layer, static=True: SimpleNamespace(layer=layer, x=x, idx=idx, w=w, static=static)  # noqa: E731
    off = LayerGraphs(Ffn(), 4, 8, cuda=True, capture=False)           # a GPU run with --cuda-graphs off
    assert not off.capture and off.pool is None
    graphs = LayerGraphs(Ffn(), 4, 8, cuda=False)
    one = graphs(call(1))
    assert graphs(call(2)) is one and graphs(call(3)) is not one and not one.graphs
    assert graphs(call(1, static=False)) is not one

"""The makespan planner: exact against brute force on small cases, never worse than all-fetch or all-CPU."""
import random
from collections import Counter
from itertools import product
from math import prod

import pytest

from cost_model.costs import CostModel, Curve
from hybrid.planning.scheduler import EXACT_LIMIT, CpuPlanner, FetchPlanner, LaneState, MakespanPlanner, makespan


def costs(seed=0):
    r = random.Random(seed)
    return CostModel(fetch_ms=r.uniform(0.2, 0.5), gpu_ms=Curve([1, 512], [0.07, r.uniform(0.08, 0.2)]),
                     cpu_ms=Curve([1, 16, 512], [r.uniform(0.2, 0.5), r.uniform(0.4, 0.9), r.uniform(3, 8)]),
                     xfer_ms=Curve([1, 512], [0.02, 0.1]), layer_overhead_ms=0.05,
                     fetch_latency_ms=r.choice([0.0, 0.05, 0.2]))


def case(r):
    experts = r.sample(range(64), r.randint(1, 10))
    tokens = {e: r.choice([1, 1, 2, 3, 8, 40, 200]) for e in experts}
    cached = {e for e in experts if r.random() < 0.3}
    return tokens, cached


def brute(c, tokens, cached, backlog=0.0, penalty=0.0):
    hits = [e for e in tokens if e in cached]
    misses = [e for e in tokens if e not in cached]
    best = float("inf")
    for bits in product((0, 1), repeat=len(misses)):
        cpu = [e for e, b in zip(misses, bits) if b]
        fetch = [e for e, b in zip(misses, bits) if not b]
        best = min(best, makespan(c, tokens, hits, fetch, cpu, backlog) + penalty * len(fetch))
    return best


def space(tokens, cached):
    counts = Counter(n for e, n in tokens.items() if e not in cached)
    return prod(s + 1 for s in counts.values())


def test_matches_brute_force_where_exact_and_stays_close_elsewhere():
    r = random.Random(1)
    exact = approx = 0
    worst = 1.0
    for i in range(400):
        c = costs(i)
        tokens, cached = case(r)
        backlog = r.choice([0.0, 0.0, 0.35, 1.0])          # PCIe still busy with earlier copies (multiples of 0.05)
        plan = MakespanPlanner(c).plan(tokens, cached, LaneState(backlog_ms=backlog))
        best = brute(c, tokens, cached, backlog)
        assert sorted(plan.hits + plan.fetch + plan.cpu) == sorted(tokens)
        assert set(plan.hits) == set(tokens) & cached
        assert abs(plan.predicted_ms - makespan(c, tokens, plan.hits, plan.fetch, plan.cpu, backlog)) < 1e-9
        if space(tokens, cached) <= EXACT_LIMIT:
            assert abs(plan.predicted_ms - best) < 1e-9
            exact += 1
        else:
            worst = max(worst, plan.predicted_ms / best)
            approx += 1
    assert exact > 200 and approx > 20
    assert worst < 1.10


def test_never_worse_than_all_fetch_or_all_cpu_on_large_cases():
    r = random.Random(2)
    for i in range(100):
        c = costs(i)
        tokens = {e: r.randint(1, 300) for e in r.sample(range(64), 64)}    # prefill-like: exhaustive is off
        cached = set(r.sample(sorted(tokens), 10))
        hybrid = MakespanPlanner(c).plan(tokens, cached).predicted_ms
        assert hybrid <= FetchPlanner(c).plan(tokens, cached).predicted_ms + 1e-9
        assert hybrid <= CpuPlanner(c).plan(tokens, cached).predicted_ms + 1e-9


def test_decode_splits_misses_across_both_lanes():
    c = CostModel(fetch_ms=0.32, gpu_ms=Curve([1], [0.07]), cpu_ms=Curve([1], [0.3]), xfer_ms=Curve([1], [0.02]))
    plan = MakespanPlanner(c).plan({e: 1 for e in range(6)}, cached=set())
    assert len(plan.fetch) == 3 and len(plan.cpu) == 3


def test_prefill_sends_heavy_experts_to_the_gpu():
    c = costs(0)
    plan = MakespanPlanner(c).plan({0: 500, 1: 400, 2: 1}, cached=set())
    assert 0 in plan.fetch and 1 in plan.fetch


def test_a_busy_pcie_lane_moves_misses_to_the_cpu():
    c = CostModel.defaults()
    free = MakespanPlanner(c).plan({e: 1 for e in range(4)}, cached=set())
    busy = MakespanPlanner(c).plan({e: 1 for e in range(4)}, cached=set(), lanes=LaneState(backlog_ms=2.0))
    assert free.fetch and len(busy.cpu) > len(free.cpu)
    assert busy.predicted_ms >= free.predicted_ms


def test_fetch_penalty_matches_brute_force_and_moves_misses_to_the_cpu():
    r = random.Random(3)
    checked = 0
    for i in range(300):
        c = costs(i)
        tokens, cached = case(r)
        if space(tokens, cached) > EXACT_LIMIT:
            continue
        penalty = r.choice([0.1, 0.3, 1.0])
        plan = MakespanPlanner(c).plan(tokens, cached, LaneState(fetch_penalty_ms=penalty))
        free = MakespanPlanner(c).plan(tokens, cached)
        objective = plan.predicted_ms + penalty * len(plan.fetch)
        assert abs(plan.predicted_ms - makespan(c, tokens, plan.hits, plan.fetch, plan.cpu)) < 1e-9
        assert abs(objective - brute(c, tokens, cached, 0.0, penalty)) < 1e-9
        assert len(plan.fetch) <= len(free.fetch) and plan.predicted_ms >= free.predicted_ms - 1e-9
        for other in (FetchPlanner(c).plan(tokens, cached), CpuPlanner(c).plan(tokens, cached)):
            assert objective <= other.predicted_ms + penalty * len(other.fetch) + 1e-9
        checked += 1
    assert checked > 150


def test_max_fetch_caps_copies_and_stays_exact():
    r = random.Random(4)
    for i in range(200):
        c = costs(i)
        tokens, cached = case(r)
        cap = r.randint(0, 4)
        plan = MakespanPlanner(c).plan(tokens, cached, LaneState(max_fetch=cap))
        assert len(plan.fetch) <= cap
        assert sorted(plan.hits + plan.fetch + plan.cpu) == sorted(tokens)
        if space(tokens, cached) <= EXACT_LIMIT:
            hits = [e for e in tokens if e in cached]
            misses = [e for e in tokens if e not in cached]
            best = min(makespan(c, tokens, hits, [e for e, b in zip(misses, bits) if not b],
                                [e for e, b in zip(misses, bits) if b])
                       for bits in product((0, 1), repeat=len(misses)) if len(misses) - sum(bits) <= cap)
            assert abs(plan.predicted_ms - best) < 1e-9
    big = {e: 1 + e % 3 for e in range(50)}             # batch-16-like: the O(misses) scan honours the cap too
    assert len(MakespanPlanner(CostModel.defaults()).plan(big, set(), LaneState(max_fetch=5)).fetch) <= 5


def test_a_late_cpu_lane_moves_misses_to_pcie_and_is_costed():
    c = CostModel.defaults()
    tokens = {e: 1 for e in range(6)}
    prompt = MakespanPlanner(c).plan(tokens, cached=set())
    late = MakespanPlanner(c).plan(tokens, cached=set(), lanes=LaneState(cpu_lag_ms=0.6))
    assert prompt.cpu and len(late.cpu) < len(prompt.cpu)
    assert abs(late.predicted_ms - makespan(c, tokens, late.hits, late.fetch, late.cpu, 0.0, 0.6)) < 1e-9
    slow = MakespanPlanner(c).plan(tokens, cached=set(), lanes=LaneState(cpu_scale=2.0))
    fast = MakespanPlanner(c).plan(tokens, cached=set(), lanes=LaneState(cpu_scale=0.5))
    assert len(slow.cpu) < len(prompt.cpu) < len(fast.cpu)
    assert abs(slow.predicted_ms - makespan(c, tokens, slow.hits, slow.fetch, slow.cpu, 0.0, 0.0, 2.0)) < 1e-9


@pytest.mark.parametrize("tokens", [7, 100])      # plain Python (<= PYTHON_PICKS picks) and NumPy
def test_cpu_rows_are_the_tail_of_the_full_layout(tokens):
    import numpy as np
    from hybrid.offload.layer_layout import PYTHON_PICKS, cpu_rows, layer_layout
    rng = np.random.default_rng(1)
    K, E = 3, 12
    flat = np.concatenate([rng.choice(E, K, replace=False) for _ in range(tokens)])   # top-3
    assert (flat.shape[0] <= PYTHON_PICKS) == (tokens == 7)
    counts = np.bincount(flat, minlength=E)
    used = [int(e) for e in np.flatnonzero(counts)]
    hits, fetch, cpu = used[:3], used[3:5], used[5:][::-1]
    rows, segs = cpu_rows(flat, K, counts, cpu)
    lay = layer_layout(flat, counts, [[(e, i) for i, e in enumerate(hits)], [(e, 5 + i) for i, e in enumerate(fetch)]],
                       cpu, 8)
    assert segs == lay.cpu_segments and rows.tolist() == (lay.perm[lay.cpu_start:] // K).tolist()
    assert rows.dtype == np.int32 and [e for e, *_ in segs] == cpu
    assert all(flat[K * t:K * t + K].tolist().count(e) for e, a, c in segs for t in rows[a:a + c])
    one = flat[:K]                                   # one token: the fast path gives what the layout does
    counts1 = np.bincount(one, minlength=E)
    cpu1 = [int(e) for e in one[1:]]
    rows1, segs1 = cpu_rows(one, K, counts1, cpu1)
    lay1 = layer_layout(one, counts1, [[(int(one[0]), 0)]], cpu1, 8)
    assert segs1 == lay1.cpu_segments and rows1.tolist() == (lay1.perm[lay1.cpu_start:] // K).tolist() == [0, 0]


def test_plans_carry_their_copy_waves():
    from hybrid.planning.scheduler import FetchPlanner, LaneState
    tokens = {e: 1 for e in range(7)}
    decode = FetchPlanner().plan(tokens, {0}, LaneState(max_fetch=6, wave_size=2))
    assert decode.one_wave and decode.waves == [decode.fetch] and len(decode.fetch) == 6
    prefill = FetchPlanner().plan(tokens, {0}, LaneState(max_fetch=None, wave_size=4))
    assert not prefill.one_wave and [len(w) for w in prefill.waves] == [4, 2]
    assert [e for w in prefill.waves for e in w] == prefill.fetch
    too_many = FetchPlanner().plan(tokens, set(), LaneState(max_fetch=6, wave_size=3))
    assert not too_many.one_wave and [len(w) for w in too_many.waves] == [3, 3, 1]


def test_the_all_hits_plan_is_what_every_planner_plans_for_a_cached_layer():
    """Decode's fast path (every needed expert cached) skips the lanes' state: its plan must be the one each
    planner would have made, whatever the lanes' state, predicted time included."""
    rng = random.Random(3)
    for planner in (FetchPlanner(costs(1)), CpuPlanner(costs(2)), MakespanPlanner(costs(3))):
        for _ in range(20):
            tokens = {e: rng.randint(1, 16) for e in rng.sample(range(64), rng.randint(1, 40))}
            lanes = LaneState(rng.uniform(0, 2), rng.uniform(-0.2, 0.5), rng.uniform(0.8, 2), rng.uniform(0, 1), 18)
            full, fast = planner.plan(tokens, set(range(64)), lanes), planner.all_hits(tokens)
            assert sorted(fast.hits) == sorted(full.hits) == sorted(tokens) and not fast.fetch and not fast.cpu
            assert abs(fast.predicted_ms - full.predicted_ms) < 1e-9 and fast.one_wave and full.one_wave


def test_a_layers_smaller_experts_scale_its_copies_and_cpu_experts_and_stay_exact():
    """A GGUF layer whose experts are smaller than the calibrated format's (bytes_scale < 1): copies and CPU experts
    cost that share of the calibrated time, in the exact search as in brute force, and in every planner."""
    r = random.Random(3)
    for i in range(150):
        c, (tokens, cached) = costs(i), case(r)
        if space(tokens, cached) > EXACT_LIMIT:
            continue
        lanes = LaneState(bytes_scale=0.83)
        plan = MakespanPlanner(c).plan(tokens, cached, lanes)
        hits, misses = [e for e in tokens if e in cached], [e for e in tokens if e not in cached]
        best = min(makespan(c, tokens, hits, [e for e, b in zip(misses, bits) if not b],
                            [e for e, b in zip(misses, bits) if b], bytes_scale=0.83)
                   for bits in product((0, 1), repeat=len(misses)))
        assert abs(plan.predicted_ms - best) < 1e-9
        if misses:
            assert plan.predicted_ms <= MakespanPlanner(c).plan(tokens, cached).predicted_ms
    tokens = {1: 1, 2: 1, 3: 1}
    fetch, cpu = FetchPlanner(c), CpuPlanner(c)
    assert fetch.plan(tokens, set(), LaneState(bytes_scale=0.5)).predicted_ms < fetch.plan(tokens, set()).predicted_ms
    assert cpu.plan(tokens, set(), LaneState(bytes_scale=0.5)).predicted_ms < cpu.plan(tokens, set()).predicted_ms


def test_the_memo_stays_bounded_over_a_long_run_and_its_plans_are_a_fresh_planners():
    """A server runs batch-16 layers for hours and their keys hardly repeat: the memo is emptied at MEMO_LIMIT,
    and a plan after that is the one a fresh planner makes."""
    r = random.Random(5)
    c, planner = costs(5), MakespanPlanner(costs(5))
    planner.MEMO_LIMIT = 50
    for i in range(400):
        tokens = {e: r.randint(1, 4) for e in r.sample(range(64), r.randint(20, 50))}
        cached = set(r.sample(sorted(tokens), len(tokens) // 2))
        lanes = LaneState(cpu_lag_ms=r.choice([0.0, 0.1, 0.2]))
        plan, fresh = planner.plan(tokens, cached, lanes), MakespanPlanner(c).plan(tokens, cached, lanes)
        assert len(planner.memo) <= 50
        assert (plan.hits, plan.fetch, plan.cpu) == (fresh.hits, fresh.fetch, fresh.cpu)
        assert plan.predicted_ms == fresh.predicted_ms


def test_the_pcie_lane_costs_one_start_per_layer_then_each_copy():
    c = costs(3)
    c.fetch_latency_ms, tokens = 0.2, {1: 1, 2: 1, 3: 1}
    assert c.pcie_ms(0) == 0 and abs(c.pcie_ms(3) - (0.2 + 3 * c.fetch_ms)) < 1e-12
    assert abs(c.pcie_ms(2, bytes_scale=0.5) - (0.2 + c.fetch_ms)) < 1e-12
    only_fetch = makespan(c, tokens, [], [1, 2, 3], [])
    c.fetch_latency_ms = 0.0
    assert abs(only_fetch - makespan(c, tokens, [], [1, 2, 3], []) - 0.2) < 1e-12


def test_room_past_the_misses_plans_alike_and_shares_one_memo_entry():
    c, tokens = costs(4), {1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1}
    p = MakespanPlanner(c)
    plans = [p.plan(tokens, {1}, LaneState(max_fetch=room)) for room in (5, 9, 40)]
    assert len(p.memo) == 1 and all((q.fetch, q.cpu, q.predicted_ms) == (plans[0].fetch, plans[0].cpu,
                                                                          plans[0].predicted_ms) for q in plans)
    p.plan(tokens, {1}, LaneState(max_fetch=2))                  # fewer than the 5 misses: a decision of its own
    assert len(p.memo) == 2

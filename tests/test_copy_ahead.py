"""Prefill copy-ahead: the next layer's experts copied into held staging slots during a prefill layer. It changes
when copies happen, never the function computed, and copies made ahead are counted as misses, not hits."""
import pytest

from hybrid.planning.copy_ahead import CopyAhead
from hybrid.engine.sampling import SamplingParams
from conftest import budget_for, make

LONG = [[(7 * i + 3 * b) % 1000 + 10 for i in range(40)] for b in range(3)]     # 40-token prompts: prefill path


def test_copy_ahead_learns_the_gap_in_whole_copies():
    c = CopyAhead(fetch_ms=0.5, max_copies=6)
    assert c.count() == 0                        # nothing known before a first gap
    c.observe(1.6)
    assert c.count() == 3
    c.issued = 3                                 # those 3 filled 1.5 ms of a 1.7 ms gap: the gap is still 1.7
    c.observe(0.2)
    assert c.count() == 3 and c.issued == 0
    c.issued = 3
    c.observe(-1.5)                              # copies still queued: made too many, the gap was 0
    assert c.count() == 1
    c.observe(50.0)
    assert c.count() == 6                        # capped


def test_copy_ahead_choice_prefers_predicted_then_policy_value():
    values = {0: 1.0, 1: 5.0, 2: 3.0, 3: 0.0}
    assert CopyAhead.choose(2, 4, {1}, values.get) == [2, 0]
    assert CopyAhead.choose(3, 4, {1}, values.get, predicted=[3, 1, 3]) == [3, 2, 0]
    assert CopyAhead.choose(9, 4, {0, 1, 2, 3}) == []


def test_staging_ring_skips_held_slots(tiny):
    e = make(tiny, mode="fetch", gpu_memory=budget_for(tiny, 20))
    cache = e.backend.cache
    for s in cache.staging[1:]:
        cache.hold(s)
    assert {cache.staging_slot() for _ in range(5)} == {cache.staging[0]}
    cache.hold(cache.staging[0])
    with pytest.raises(RuntimeError, match="held"):
        cache.staging_slot()
    cache.release(cache.staging[2])
    assert cache.staging_slot() == cache.staging[2] and cache.held_count == len(cache.staging) - 1


@pytest.mark.parametrize("mode", ["fetch", "hybrid"])
@pytest.mark.parametrize("prefetch", ["none", "gate"])
def test_copy_ahead_is_exact_and_counted_as_misses(tiny, mode, prefetch, monkeypatch):
    ref = make(tiny).generate(LONG, SamplingParams(max_new_tokens=6, stop_on_eos=False))
    monkeypatch.setattr(CopyAhead, "count", lambda self: 4)
    kw = dict(mode=mode, prefetch=prefetch, gpu_memory=budget_for(tiny, 12), cache_layout="spread")  # all shares
    e, off = make(tiny, **kw), make(tiny, copy_ahead=False, **kw)         # (no prefetch into held staging slots)
    assert off.backend.next.policy is None and e.backend.next.policy is not None
    out = e.generate(LONG, SamplingParams(max_new_tokens=6, stop_on_eos=False))
    assert out.tokens == ref.tokens
    x = out.stats.experts
    assert x.copied_ahead > 0 and 0 < x.copied_ahead_used <= x.copied_ahead
    assert not e.backend.cache.held_count and not e.backend.next.ahead       # every held slot released
    plain = off.generate(LONG, SamplingParams(max_new_tokens=6, stop_on_eos=False)).stats.experts
    assert plain.copied_ahead == 0
    assert x.hits + x.misses == plain.hits + plain.misses            # copies made ahead are not hits


def test_cpu_mode_never_copies_ahead(tiny):
    e = make(tiny, mode="cpu", gpu_memory=budget_for(tiny, 12))
    assert e.backend.next.policy is None


def test_copies_made_ahead_are_queued_after_the_layers_cpu_results(tiny, monkeypatch):
    """A small copy on the compute stream waits behind expert copies queued before it on the copy engine: a
    layer's CPU results go out before the copies it makes ahead for the next layer."""
    from hybrid.offload.cpu_work import CpuWork
    from hybrid.offload.expert_copies import ExpertCopies
    from hybrid.offload.next_layer import NextLayerCopies
    monkeypatch.setattr(CopyAhead, "count", lambda self: 3)
    e = make(tiny, mode="hybrid", gpu_memory=budget_for(tiny, 12))
    log = []
    issue, run_cpu, choose = ExpertCopies.issue, CpuWork.run, NextLayerCopies.copy_ahead

    def chosen(self, layer, experts):
        nxt, wave = choose(self, layer, experts)
        log.append(("ahead", layer, id(wave) if wave else None))
        return nxt, wave
    monkeypatch.setattr(NextLayerCopies, "copy_ahead", chosen)
    monkeypatch.setattr(ExpertCopies, "issue", lambda self, layer, wave: (
        log.append(("copy", layer, id(wave))), issue(self, layer, wave))[1])
    monkeypatch.setattr(CpuWork, "run", lambda self, layer, *a: (
        log.append(("cpu", layer, None)), run_cpu(self, layer, *a))[1])
    monkeypatch.setattr(e.backend.cpu.experts, "pool_threads", 0)       # CPU experts on this thread: logged
    e.generate(LONG[:1], SamplingParams(max_new_tokens=1))
    checked = 0
    for i, (kind, layer, w) in enumerate(log):
        if kind != "ahead" or w is None:
            continue
        j = next(j for j in range(i + 1, len(log)) if log[j][0] == "copy" and log[j][2] == w)
        cpu = next((k for k in range(i + 1, len(log)) if log[k][:2] == ("cpu", layer)), None)
        if cpu is not None and cpu < next((k for k in range(i + 1, len(log)) if log[k][0] == "ahead"), len(log)):
            assert cpu < j                     # the layer ran CPU experts: its copies ahead went out after them
            checked += 1
    assert checked > 0

"""Copy-ahead: the next layer's experts copied into held staging slots during a layer (prefill, and decode at
batch sizes where most such copies get used). It changes when copies happen, never the function computed, and
copies made ahead are counted as misses, not hits."""
import pytest

from hybrid.copy_ahead import CopyAhead
from hybrid.sampling import SamplingParams
from test_modes import budget_for, make

LONG = [[(7 * i + 3 * b) % 1000 + 10 for i in range(40)] for b in range(3)]     # 40-token prompts: prefill path


def test_copy_ahead_learns_the_gap_in_whole_copies():
    c = CopyAhead(fetch_ms=0.5, max_copies=6, top_k=6, n_experts=64)
    assert c.count(256) == 0                        # nothing known before a first gap
    c.observe(1.6)
    assert c.count(256) == 3
    c.issued = 3                                 # those 3 filled 1.5 ms of a 1.7 ms gap: the gap is still 1.7
    c.observe(0.2)
    assert c.count(256) == 3 and c.issued == 0
    c.issued = 3
    c.observe(-1.5)                              # copies still queued: made too many, the gap was 0
    assert c.count(256) == 1
    c.observe(50.0)
    assert c.count(256) == 6                        # capped


def test_decode_copies_ahead_only_while_most_copies_get_used():
    c = CopyAhead(fetch_ms=0.3, max_copies=6, top_k=6, n_experts=64)
    c.observe(1.0)
    assert c.count(1) == 0 and c.count(4) == 0        # uniform routing: 9% / 32% of them would be used
    assert c.count(16) == 3                           # 79%
    c.note_use(16, used=1, made=3)
    c.note_use(16, used=0, made=3)
    assert c.useful(16) < 0.5 and c.count(16) == 0    # learned: too few used
    c.note_use(8, used=3, made=3)
    assert c.useful(8) > c.useful(4) and c.count(8) == 3
    c.note_use(8, used=0, made=0)                     # nothing made: nothing learned
    assert c.count(8) == 3


def test_copy_ahead_choice_prefers_predicted_then_policy_value():
    values = {0: 1.0, 1: 5.0, 2: 3.0, 3: 0.0}
    assert CopyAhead.choose(2, 4, {1}, values.get) == [2, 0]
    assert CopyAhead.choose(3, 4, {1}, values.get, predicted=[3, 1, 3]) == [3, 2, 0]
    assert CopyAhead.choose(9, 4, {0, 1, 2, 3}) == []


def test_staging_ring_skips_held_slots(tiny):
    e = make(tiny, mode="fetch", gpu_memory=budget_for(tiny, 20))
    cache = e.backend.cache
    cache.held = set(cache.staging[1:])
    assert {cache.staging_slot() for _ in range(5)} == {cache.staging[0]}
    cache.held = set(cache.staging)
    with pytest.raises(RuntimeError, match="held"):
        cache.staging_slot()


@pytest.mark.parametrize("mode", ["fetch", "hybrid"])
@pytest.mark.parametrize("prefetch", ["none", "gate"])
def test_copy_ahead_is_exact_and_counted_as_misses(tiny, mode, prefetch, monkeypatch):
    ref = make(tiny).generate(LONG, SamplingParams(max_new_tokens=6, stop_on_eos=False))
    monkeypatch.setattr(CopyAhead, "count", lambda self, T: 4)
    e = make(tiny, mode=mode, prefetch=prefetch, gpu_memory=budget_for(tiny, 12))
    off = make(tiny, mode=mode, prefetch=prefetch, gpu_memory=budget_for(tiny, 12), copy_ahead=False)
    assert off.backend.copy_ahead is None and e.backend.copy_ahead is not None
    out = e.generate(LONG, SamplingParams(max_new_tokens=6, stop_on_eos=False))
    assert out.tokens == ref.tokens
    x = out.stats.experts
    assert x.copied_ahead > 0 and 0 < x.copied_ahead_used <= x.copied_ahead
    assert not e.backend.cache.held and not e.backend.ahead       # every held slot released
    plain = off.generate(LONG, SamplingParams(max_new_tokens=6, stop_on_eos=False)).stats.experts
    assert plain.copied_ahead == 0
    assert x.hits + x.misses == plain.hits + plain.misses            # copies made ahead are not hits


def test_cpu_mode_never_copies_ahead(tiny):
    e = make(tiny, mode="cpu", gpu_memory=budget_for(tiny, 12))
    assert e.backend.copy_ahead is None


@pytest.mark.parametrize("mode", ["fetch", "hybrid"])
def test_decode_copy_ahead_is_exact_and_releases_its_slots(tiny, mode, monkeypatch):
    ref = make(tiny).generate(LONG, SamplingParams(max_new_tokens=8, stop_on_eos=False))
    monkeypatch.setattr(CopyAhead, "count", lambda self, T: 4 if T <= 3 else 0)     # decode only, 4 of 12 staging
    on = make(tiny, mode=mode, gpu_memory=budget_for(tiny, 12))
    pre = make(tiny, mode=mode, gpu_memory=budget_for(tiny, 12), decode_copy_ahead=False)
    assert pre.backend.copy_ahead is not None and pre.backend.decode_ahead is None
    out = on.generate(LONG, SamplingParams(max_new_tokens=8, stop_on_eos=False))
    assert out.tokens == ref.tokens
    x = out.stats.experts
    assert x.copied_ahead > 0 and 0 < x.copied_ahead_used <= x.copied_ahead
    assert not on.backend.cache.held and not on.backend.ahead
    assert pre.generate(LONG, SamplingParams(max_new_tokens=8, stop_on_eos=False)).stats.experts.copied_ahead == 0
    assert on.backend.decode_ahead.use.get(3) is not None      # what share got used was learned

"""Cache policies evict in the documented order; the slot cache honours protection and admission."""
import torch

from hybrid.offload.cache_policy import LFUDecay, LRU, Static
from hybrid.model.config import ModelConfig
from hybrid.offload.expert_cache import ExpertCache
from hybrid.model.synthetic import PRESETS


def test_lru_evicts_least_recently_used():
    p = LRU()
    for k in "abc":
        p.insert(k)
    p.touch("a")
    assert p.victim("abc") == "b"
    assert p.victim("ac") == "c"


def test_lfu_evicts_least_frequent_and_decays():
    p = LFUDecay(decay=0.5)
    for k, n in (("a", 3), ("b", 1), ("c", 2)):
        for _ in range(n):
            p.touch(k)
    assert p.victim("abc") == "b"
    for _ in range(4):
        p.tick()
    p.touch("b")                       # old counts decayed by 1/16: b's fresh use now outweighs a's past
    assert p.victim("abc") == "c"
    assert p.victim("ab") == "a"


def test_static_never_admits():
    assert not Static.admits and Static().victim("abc") is None


def cache(policy):
    cfg = ModelConfig.from_dict(PRESETS["tiny"][0])
    c = ExpertCache(cfg, n_slots=6, n_staging=2, dtype=torch.float32, device="cpu", policy=policy)
    for e in range(2):
        for layer in cfg.moe_layers:
            c.place(layer, e)
    return c


def test_cache_partitions_slots_per_layer_and_protects_needed_experts():
    c = cache("lru")
    assert c.cached(1) == {0, 1} and c.cached(3) == {0, 1}
    c.touch(1, [1])
    slot = c.admit(1, 5, protected={0, 5})
    assert slot is not None and c.cached(1) == {0, 5}             # 1 was evictable, 0 protected
    assert c.admit(1, 6, protected={0, 5, 6}) is None              # everything protected: staging instead
    assert c.staging_slot() in c.staging


def test_static_cache_keeps_its_placement():
    c = cache("static")
    assert c.admit(2, 9, protected=set()) is None and c.cached(2) == {0, 1}

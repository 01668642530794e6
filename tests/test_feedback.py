"""The executor's lane feedback (lag, CPU-cost correction) and the prefetch penalty: pure Python."""
import numpy as np

from cost_model.costs import CostModel, Curve
from hybrid.model.config import ModelConfig
from hybrid.planning.lane_feedback import LAG_CAP_MS, PREFILL_LAG_CAP_MS, SCALE_RANGE, LaneFeedback
from hybrid.planning.prefetch import Prefetcher


def test_lag_is_capped_and_decays_without_cpu_work():
    fb = LaneFeedback()
    fb.note_lag(1, 250.0)                          # a graph capture, not lag
    assert fb.lag_ms(1) == LAG_CAP_MS
    for _ in range(200):
        fb.note_lag(1, None)
    assert fb.lag_ms(1) < 0.05 and fb.lag_ms(16) == fb.lag_ms(1)      # 16: nearest decode count seen
    assert fb.lag_ms(17) == 0.0                                         # prefill: nothing learned yet
    for _ in range(100):
        fb.note_lag(1, 0.3)
    assert abs(fb.lag_ms(1) - 0.3) < 1e-3


def test_unseen_token_counts_borrow_the_nearest_on_their_side():
    fb = LaneFeedback(decode_tokens=4)
    fb.note_lag(128, 1.6)                          # a prefill's lag: above the decode cap, under prefill's
    fb.note_lag(512, 9.0)
    assert fb.lag_ms(128) == 1.6 and fb.lag_ms(512) == PREFILL_LAG_CAP_MS
    assert fb.lag_ms(200) == 1.6 and fb.lag_ms(400) == PREFILL_LAG_CAP_MS and fb.lag_ms(3000) == PREFILL_LAG_CAP_MS
    assert fb.lag_ms(4) == 0.0                     # decode never borrows from prefill
    fb.note_lag(1, 0.2)
    assert fb.lag_ms(3) == 0.2 and fb.lag_ms(5) == 1.6
    c = CostModel(fetch_ms=0.33, gpu_ms=Curve([1], [0.05]), cpu_ms=Curve([1], [0.3]), xfer_ms=Curve([1], [0.0]),
                  cpu_dispatch_ms=0.0)
    fb.note_cpu(c, 256, 0.45, [1])
    assert fb.cpu_scale(256) == fb.cpu_scale(300) == 1.5 and fb.cpu_scale(2) == 1.0


def test_cpu_scale_follows_measurements_within_its_range():
    c = CostModel(fetch_ms=0.33, gpu_ms=Curve([1], [0.05]), cpu_ms=Curve([1], [0.3]), xfer_ms=Curve([1], [0.0]),
                  cpu_dispatch_ms=0.1)
    fb = LaneFeedback()
    assert fb.cpu_scale(1) == 1.0
    for _ in range(100):
        fb.note_cpu(c, 1, 0.5 * (0.1 + 2 * 0.3), [1, 1])          # the lane runs twice as fast as calibrated
    assert abs(fb.cpu_scale(1) - 0.5) < 1e-3
    for _ in range(100):
        fb.note_cpu(c, 1, 100.0, [1])
    assert fb.cpu_scale(1) <= SCALE_RANGE[1] + 1e-9


def test_prefetch_penalty_only_where_a_prefetch_could_help():
    cfg = ModelConfig.from_dict({"model_type": "deepseek_v2", "vocab_size": 8, "hidden_size": 8,
                                 "intermediate_size": 8, "moe_intermediate_size": 4, "num_hidden_layers": 3,
                                 "num_attention_heads": 2, "n_routed_experts": 8, "n_shared_experts": 1,
                                 "num_experts_per_tok": 2, "kv_lora_rank": 4, "qk_nope_head_dim": 2,
                                 "qk_rope_head_dim": 2, "v_head_dim": 2, "rms_norm_eps": 1e-6,
                                 "max_position_embeddings": 64, "first_k_dense_replace": 1})
    p = Prefetcher(cfg)
    pred = np.array([[3, 5]])
    resident = {1: set(), 2: {3}}.__getitem__                          # layer -> its cached experts
    first = p.penalty_ms(1, pred, resident, 0.33, 0.25)
    assert abs(first - 0.8 * 0.33 * 0.25 / 0.58) < 1e-9              # prior recall 0.8 before any scoring
    assert p.penalty_ms(2, pred, resident, 0.33, 0.25) == 0.0          # last MoE layer: nothing to prefetch
    assert p.penalty_ms(1, pred, {1: set(), 2: {3, 5}}.__getitem__, 0.33, 0.25) == 0.0
    assert Prefetcher(cfg, lookahead=False).penalty_ms(1, pred, resident, 0.33, 0.25) == 0.0

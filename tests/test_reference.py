"""The engine computes what transformers' DeepseekV2ForCausalLM computes on the same checkpoint (float32)."""
import torch

from conftest import PROMPTS, rel_err
from hybrid.model.config import RunConfig
from hybrid.engine.engine import Engine
from hybrid.model.latent_cache import LatentCache
from hybrid.engine.sampling import SamplingParams


def engine(tiny, **kw):
    return Engine(str(tiny), RunConfig(dtype="float32", max_batch_size=3, max_seq_len=128, **kw), progress=False)


def test_prefill_logits_match_transformers(tiny, reference):
    e = engine(tiny)
    for p in PROMPTS:
        ours = e.logits(p)
        with torch.no_grad():
            ref = reference(torch.tensor([p])).logits[0]
        assert rel_err(ours, ref) <= 1e-4


def test_greedy_batch_of_three_padded_prompts_matches_transformers(tiny, reference):
    out = engine(tiny).generate(PROMPTS, SamplingParams(max_new_tokens=32, stop_on_eos=False))
    for p, toks in zip(PROMPTS, out.tokens):
        with torch.no_grad():
            ref = reference.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False,
                                     min_new_tokens=32)[0, len(p):].tolist()
        assert toks == ref


def test_incremental_decode_equals_full_forward(tiny):
    e = engine(tiny)
    seq = PROMPTS[0] + [101, 202, 303, 404]
    full = e.logits(seq)
    cache = LatentCache(e.cfg, 1, len(seq), torch.float32, "cpu")
    valid = torch.ones(1, len(seq), dtype=torch.bool)
    pad = torch.zeros(1, dtype=torch.long)
    n = len(PROMPTS[0])
    e.model.forward(torch.tensor([seq[:n]]), cache, e.step_state(valid, pad, 0, n))
    for t in range(n, len(seq)):
        step = e.model.forward(torch.tensor([[seq[t]]]), cache, e.step_state(valid, pad, t, 1))[0]
        assert rel_err(step, full[t]) <= 1e-5


def test_chunked_prefill_equals_one_shot(tiny):
    one = engine(tiny).generate(PROMPTS, SamplingParams(max_new_tokens=6, stop_on_eos=False))
    chunked = Engine(str(tiny), RunConfig(dtype="float32", max_batch_size=3, max_seq_len=128,
                                          prefill_chunk_tokens=6), progress=False)
    two = chunked.generate(PROMPTS, SamplingParams(max_new_tokens=6, stop_on_eos=False))
    assert one.tokens == two.tokens


def test_sampling_is_seeded_and_top_p_zero_is_greedy(tiny):
    e = engine(tiny)
    s = lambda seed: e.generate(PROMPTS[:1], SamplingParams(8, temperature=1.0, top_p=0.9, seed=seed,  # noqa: E731
                                                            stop_on_eos=False)).tokens
    assert s(3) == s(3)
    greedy = e.generate(PROMPTS[:1], SamplingParams(8, stop_on_eos=False)).tokens
    assert e.generate(PROMPTS[:1], SamplingParams(8, temperature=1.0, top_p=1e-9, seed=1,
                                                  stop_on_eos=False)).tokens == greedy


def test_bf16_engine_close_to_float32(tiny):
    ref = engine(tiny).logits(PROMPTS[0])
    bf = Engine(str(tiny), RunConfig(dtype="bfloat16", max_seq_len=64), progress=False).logits(PROMPTS[0])
    assert rel_err(bf, ref) < 5e-2


def test_static_decode_path_equals_eager_decode(tiny):
    static = engine(tiny).generate(PROMPTS, SamplingParams(max_new_tokens=12, stop_on_eos=False))
    eager = engine(tiny, static_decode=False).generate(PROMPTS, SamplingParams(max_new_tokens=12, stop_on_eos=False))
    assert static.tokens == eager.tokens


def test_attention_in_query_blocks_is_exact(tiny, monkeypatch):
    import hybrid.model.deepseek
    full = engine(tiny).logits(PROMPTS[0])
    monkeypatch.setattr(hybrid.model.deepseek, "ATTN_SCORE_ELEMS", 4 * 12 * 3)      # 3 queries per block
    assert rel_err(engine(tiny).logits(PROMPTS[0]), full) <= 1e-6

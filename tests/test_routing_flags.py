"""Routing flags of the wider DeepSeek-V2 family that transformers ignores: norm_topk_prob (V2 normalises the
top-k weights and then does not scale them) and moe_layer_freq (only every n-th layer from first_k_dense_replace on
is MoE). The reference is transformers' model with its router and layer choice set to the original V2 code's."""
import pytest
import torch
from safetensors import safe_open

from conftest import PROMPTS, rel_err
from hybrid.model.config import ModelConfig
from hybrid.model.synthetic import PRESETS, write_checkpoint
from conftest import budget_for, make
from hybrid.engine.sampling import SamplingParams

FLAGS = {"num_hidden_layers": 5, "moe_layer_freq": 2, "norm_topk_prob": True, "routed_scaling_factor": 2.5}


@pytest.fixture(scope="module")
def flagged(tmp_path_factory):
    config, shards = PRESETS["tiny"]
    return write_checkpoint(tmp_path_factory.mktemp("flagged"), {**config, **FLAGS}, shards, seed=3, progress=False)


def v2_route(router, hidden_states):
    """DeepSeek-V2's gate (modeling_deepseek.py, greedy): normalise the top-k weights OR scale them."""
    logits = torch.nn.functional.linear(hidden_states.view(-1, router.hidden_dim).float(), router.weight.float())
    scores = logits.softmax(dim=-1)
    w, idx = torch.topk(scores, k=router.top_k, dim=-1, sorted=False)
    if router.top_k > 1 and FLAGS["norm_topk_prob"]:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        w = w * router.routed_scaling_factor
    return logits, w, idx


@pytest.fixture(scope="module")
def v2_reference(flagged):
    """transformers' model on the flagged checkpoint, with V2's layer choice and router."""
    from transformers import AutoModelForCausalLM
    from transformers.models.deepseek_v2 import modeling_deepseek_v2 as hf
    cfg = ModelConfig.from_json(flagged / "config.json")
    model = AutoModelForCausalLM.from_pretrained(str(flagged), dtype=torch.float32).eval()
    index = __import__("json").loads((flagged / "model.safetensors.index.json").read_text())["weight_map"]
    for i, layer in enumerate(model.model.layers):
        if i >= cfg.first_k_dense_replace and not cfg.is_moe_layer(i):         # dense in V2; MoE in transformers
            layer.mlp = hf.DeepseekV2MLP(model.config)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.{i}.mlp.{proj}.weight"
                with safe_open(str(flagged / index[name]), framework="pt") as f:
                    getattr(layer.mlp, proj).weight.data = f.get_tensor(name).float()
        elif isinstance(layer.mlp, hf.DeepseekV2Moe):
            layer.mlp.gate.forward = lambda h, r=layer.mlp.gate: v2_route(r, h)
    return model


def test_the_flags_select_layers_and_weights_as_v2_does(flagged):
    cfg = ModelConfig.from_json(flagged / "config.json")
    assert cfg.moe_layers == [2, 4]
    e = make(flagged)
    x = torch.randn(3, cfg.hidden_size)
    idx, w = e.model.layers[2][3].route(x)
    assert torch.allclose(w.sum(-1), torch.ones(3))           # normalised, and not x 2.5 afterwards


@pytest.mark.parametrize("mode,prefetch", [("gpu", "none"), ("fetch", "gate"), ("cpu", "none"), ("hybrid", "gate")])
def test_engine_matches_the_v2_reference(flagged, v2_reference, mode, prefetch):
    kw = {} if mode == "gpu" else {"gpu_memory": budget_for(flagged, 12), "prefetch": prefetch}
    e = make(flagged, mode=mode, **kw)
    for p in PROMPTS:
        with torch.no_grad():
            ref = v2_reference(torch.tensor([p])).logits[0]
        assert rel_err(e.logits(p), ref) <= 1e-4
    out = e.generate(PROMPTS, SamplingParams(max_new_tokens=12, stop_on_eos=False))
    for p, toks in zip(PROMPTS, out.tokens):
        with torch.no_grad():
            ref = v2_reference.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False,
                                        min_new_tokens=12)[0, len(p):].tolist()
        assert toks == ref


def test_transformers_alone_would_differ(flagged, v2_reference):
    """The oracle matters: transformers as it stands (all layers MoE, weights scaled) computes something else."""
    from transformers import AutoModelForCausalLM
    plain = AutoModelForCausalLM.from_pretrained(str(flagged), dtype=torch.float32).eval()
    e = make(flagged)
    with torch.no_grad():
        theirs = plain(torch.tensor([PROMPTS[0]])).logits[0]
    assert rel_err(e.logits(PROMPTS[0]), theirs) > 1e-2

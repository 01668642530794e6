"""Traces, trained expert predictors, and --prefetch mlp."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import PROMPTS, ROOT
from hybrid.offload import predictor
from hybrid.model.config import RunConfig
from hybrid.engine.engine import Engine, EngineError
from hybrid.engine.sampling import SamplingParams
from hybrid.offload.trace import load_trace
from conftest import budget_for
from test_modes import SLOTS

TRAIN = [[(7 * i + 3 * j) % 5000 + 10 for j in range(6 + i % 5)] for i in range(12)]
HELDOUT = [[(11 * i + 5 * j) % 7000 + 20 for j in range(7)] for i in range(4)]


def record(tiny, prompts, path):
    e = Engine(str(tiny), RunConfig(dtype="float32", max_batch_size=4, max_seq_len=96), progress=False)
    rec = e.record_trace(max_tokens=4096)
    for k in range(0, len(prompts), 4):
        e.generate(prompts[k:k + 4], SamplingParams(max_new_tokens=24, stop_on_eos=False))
    return load_trace(rec.save(path))


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("pred")
    train_trace, test_trace = record(tiny, TRAIN, d / "train.npz"), record(tiny, HELDOUT, d / "test.npz")
    from hybrid.model.checkpoint import Checkpoint
    ck = Checkpoint(tiny)
    routers = {L: ck.get(f"model.layers.{L}.mlp.gate.weight").float() for L in train_trace["layers"]}
    untrained = {(L, 1): predictor.ExpertMLP(routers[M]) for L, M in zip(train_trace["layers"], train_trace["layers"][1:])}
    models = predictor.train(train_trace, routers, [1, 2], epochs=60, progress=False)
    path = predictor.save(d / "p.pt", models, predictor.checkpoint_key(tiny))
    return train_trace, test_trace, models, path, untrained


def test_trace_rows_line_up_across_layers(trained):
    tr = trained[0]
    n = {len(tr["x"][L]) for L in tr["layers"]} | {len(tr["idx"][L]) for L in tr["layers"]} | {len(tr["seq"])}
    assert len(n) == 1 and n.pop() > 300
    assert tr["x"][tr["layers"][0]].dtype == np.float16 and set(np.unique(tr["seq"])) == {0, 1, 2, 3}


def test_predictor_learns_well_above_chance_on_heldout(trained, tiny):
    from hybrid.model.checkpoint import Checkpoint
    _, test, models, _, untrained = trained
    ck = Checkpoint(tiny)
    routers = {L: ck.get(f"model.layers.{L}.mlp.gate.weight").float() for L in test["layers"]}
    rows = predictor.evaluate(test, models, routers)
    chance = 4 / 16
    assert np.mean([r["mlp_k1"] for r in rows]) > 2 * chance
    assert np.mean([r["mlp_k2"] for r in rows if "mlp_k2" in r]) > 1.5 * chance
    assert all(0 <= r["prev_token"] <= 1 and 0 <= r["gate_k1"] <= 1 for r in rows)
    start = predictor.evaluate(test, untrained, routers)            # before training: exactly the gate's ranking
    assert all(abs(r["mlp_k1"] - r["gate_k1"]) < 1e-9 for r in start)
    # early stopping keeps the start unless validation improves, so held-out recall stays near the gate's
    assert np.mean([r["mlp_k1"] for r in rows]) > np.mean([r["gate_k1"] for r in rows]) - 0.05


def test_save_load_round_trip_and_wrong_checkpoint(trained, tiny):
    _, test, models, path, _ = trained
    back = predictor.load(path, predictor.checkpoint_key(tiny))
    x = torch.from_numpy(test["x"][test["layers"][0]]).float()
    for key, m in models.items():
        assert torch.equal(m(x), back[key](x))
    with pytest.raises(ValueError, match="another checkpoint"):
        predictor.load(path, "0000")


def test_prefetch_mlp_is_exact_and_needs_predictors(trained, tiny):
    ref = Engine(str(tiny), RunConfig(dtype="float32", max_batch_size=3, max_seq_len=128), progress=False)
    want = ref.generate(PROMPTS, SamplingParams(max_new_tokens=10, stop_on_eos=False)).tokens
    run = RunConfig(dtype="float32", max_batch_size=3, max_seq_len=128, mode="hybrid", prefetch="mlp",
                    predictor_path=str(trained[3]), gpu_memory=budget_for(tiny, SLOTS))
    out = Engine(str(tiny), run, progress=False).generate(PROMPTS, SamplingParams(max_new_tokens=10, stop_on_eos=False))
    assert out.tokens == want and out.stats.experts.prefetched > 0
    foreign = trained[3].parent / "foreign.pt"
    predictor.save(foreign, trained[2], "another")
    run.predictor_path = str(foreign)
    with pytest.raises(EngineError, match="trained for another checkpoint"):
        Engine(str(tiny), run, progress=False)
    run.predictor_path = str(trained[3].parent / "missing.pt")
    with pytest.raises(EngineError, match="--prefetch mlp needs trained predictors"):
        Engine(str(tiny), run, progress=False)


def test_cli_records_trains_and_evaluates(tiny, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": f"prompt number {i} about experts"}) for i in range(6)))
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "--model", str(tiny), "--prompts", str(prompts),
                        "--max-new-tokens", "16", "--record-trace", str(tmp_path / "t.npz"), "--tokenizer", "bytes"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    base = [sys.executable, "-m", "hybrid.offload.predictor"]
    args = ["--model", str(tiny), "--trace", str(tmp_path / "t.npz"), "--predictors", str(tmp_path / "p.pt")]
    r = subprocess.run(base + ["train", *args, "--k", "1", "--epochs", "5"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(base + ["eval", *args, "--out", str(tmp_path / "r.json"), "--plot", str(tmp_path / "r.png")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "r.json").read_text())
    assert {"gate_k1", "mlp_k1", "prev_token"} <= set(d["mean"]) and (tmp_path / "r.png").stat().st_size > 1000

"""Cost model curves, JSON round-trip, missing or foreign calibration, and a real (tiny) calibration run."""
import json

import torch

from cost_model.costs import CostModel, Curve, load_costs
from hybrid.offload.calibration import fingerprint, measure


def test_curve_interpolates_extrapolates_and_fits_monotone():
    c = Curve.fit({1: 0.3, 4: 0.5, 16: 0.45, 64: 1.0})
    assert c.ys == [0.3, 0.475, 0.475, 1.0]                       # the violating pair is pooled
    assert abs(c(2.5) - 0.3875) < 1e-12 and c(128) > 1.0 and c(1) == 0.3
    outlier = Curve.fit({1: 0.47, 2: 0.25, 4: 0.26, 8: 0.27, 64: 0.7})
    assert outlier.ys[:4] == [0.3125] * 4 and outlier.ys[4] == 0.7   # the outlier is pooled, not propagated


def test_json_round_trip(tmp_path):
    m = CostModel.defaults()
    m.fingerprint = {"gpu": "x", "cpu": "y", "cores": 2, "threads": 1}
    m.to_json(tmp_path / "c.json")
    back, why = load_costs(tmp_path / "c.json", m.fingerprint)
    assert back == m and "calibration" in why


def test_missing_and_foreign_calibration_fall_back_to_defaults(tmp_path):
    m, why = load_costs(tmp_path / "none.json", {"gpu": "x"})
    assert m.source == "defaults" and "no calibration" in why
    other = CostModel.defaults()
    other.fingerprint = {"gpu": "H100", "cpu": "Xeon", "cores": 16, "threads": 15}
    other.to_json(tmp_path / "c.json")
    m, why = load_costs(tmp_path / "c.json", {"gpu": "none", "cpu": "Xeon", "cores": 16, "threads": 15})
    assert m.source == "defaults" and "another machine" in why and "gpu" in why
    m, why = load_costs(tmp_path / "c.json", {**other.fingerprint, "cpu_kernel": "native"})
    assert m.source == "defaults" and "cpu_kernel" in why
    (tmp_path / "bad.json").write_text("{")
    assert load_costs(tmp_path / "bad.json", {})[0].source == "defaults"


def test_calibration_measures_and_reloads(tmp_path):
    dev = torch.device("cpu")
    m = measure(dev, hidden=64, inter=32, dtype=torch.float32, threads=1, tokens=(1, 4, 16), n_host=4,
                progress=False)
    assert m.fetch_ms > 0 and m.cpu_ms(16) >= m.cpu_ms(1) > 0 and m.layer_overhead_ms > 0
    m.to_json(tmp_path / "c.json")
    back, _ = load_costs(tmp_path / "c.json", fingerprint(dev, 1, m.fingerprint["cpu_kernel"]))
    assert back.source == "calibrated" and json.loads((tmp_path / "c.json").read_text())["fetch_ms"] == m.fetch_ms
    assert m.fetch_latency_ms >= 0 and back.fetch_latency_ms == m.fetch_latency_ms      # a start, then each copy


def test_calibrate_script_measures_runtime_overheads(tmp_path):
    import subprocess
    import sys
    from conftest import ROOT
    out = tmp_path / "costs.json"
    r = subprocess.run([sys.executable, str(ROOT / "calibrate.py"), "--hidden", "64", "--inter", "32",
                        "--tokens", "1,4", "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["layer_overhead_ms"] > 0 and d["cpu_dispatch_ms"] >= 0 and d["source"] == "calibrated"


def test_each_expert_format_has_its_own_calibration(tmp_path):
    dev = torch.device("cpu")
    q4 = measure(dev, hidden=64, inter=32, dtype=torch.float32, threads=1, tokens=(1, 4), n_host=4,
                 progress=False, experts="q4")
    assert q4.fingerprint["experts"] == "q4" and q4.cpu_ms(1) > 0 and q4.gpu_ms(4) > 0
    q4.to_json(tmp_path / "q4.json")
    as_bf16 = fingerprint(dev, 1, q4.fingerprint["cpu_kernel"], "bf16")
    model, why = load_costs(tmp_path / "q4.json", as_bf16)
    assert model.source == "defaults" and "experts" in why
    assert load_costs(tmp_path / "q4.json", {**as_bf16, "experts": "q4"})[0].source == "calibrated"


def test_the_calibrated_overhead_is_a_planned_layers(monkeypatch):
    """calibrate.py times a layer whose experts are all cached through the plan (what the cost model prices), not
    through a decode guess, which skips it (every expert of the tiny model is cached there)."""
    import torch
    import calibrate
    from hybrid.offload.guesses import Guesses
    outcomes, take = [], Guesses.take
    monkeypatch.setattr(Guesses, "take", lambda self, call, flat: outcomes.append(take(self, call, flat)) or None)
    calibrate.engine_overheads(torch.device("cpu"), "float32", "auto", True)
    assert outcomes and all(o is None for o in outcomes)

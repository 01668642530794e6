"""The evaluation sweep runs end to end on the tiny checkpoint: schema, plots, resume, failed cells recorded."""
import csv
import json
import subprocess
import sys

from conftest import ROOT

SWEEP = ROOT / "eval" / "compare_modes.py"


def sweep(tiny, out, modes):
    return subprocess.run([sys.executable, str(SWEEP), "--model", str(tiny), "--modes", modes, "--batch-sizes", "1",
                           "--prompt-lens", "12,20", "--new-tokens", "4", "--out-dir", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_sweep_writes_json_csv_and_plots_and_resumes(tiny, tokenizer_dir, tmp_path):
    r = sweep(tiny, tmp_path, "hybrid,bogus")
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "results.json").read_text())
    assert {"date", "command", "device", "torch", "transformers"} <= set(d["meta"])
    good = [x for x in d["rows"] if not x.get("error")]
    bad = [x for x in d["rows"] if x.get("error")]
    assert {(x["mode"], x["prompt_tokens"]) for x in good} == {("hybrid", 12), ("hybrid", 20)}
    assert len(bad) == 2 and all("unknown mode 'bogus'" in x["error"] for x in bad)
    for x in good:
        assert x["new_tokens"] == 4 and x["ttft_ms"] > 0 and x["decode_tok_s"] > 0 and 0 <= x["hit_rate"] <= 1
        assert x["ttft_first_ms"] > 0 and x["ttft_second_ms"] > 0          # the two prefills before the measured one
        assert {"tpot_ms_p50", "tpot_ms_p90", "e2e_tok_s", "peak_gpu_gib", "gb_over_pcie", "cpu_share"} <= set(x)
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    for png in ("latency.png", "throughput.png", "traffic.png", "cost_model.png"):
        assert (tmp_path / png).stat().st_size > 1000
    again = sweep(tiny, tmp_path, "hybrid")                        # resumes: finished cells are not run again
    assert again.returncode == 0
    rerun = [x for x in json.loads((tmp_path / "results.json").read_text())["rows"] if not x.get("error")]
    assert [x["ttft_ms"] for x in rerun] == [x["ttft_ms"] for x in good]

"""The llama.cpp runner and the quantized results table, against fake llama.cpp binaries."""
import json
import stat
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "eval"))
import llamacpp_bench  # noqa: E402
import quant_results  # noqa: E402

BENCH = """#!{py}
import json, sys
a = sys.argv
ncmoe = int(a[a.index("-ncmoe") + 1])
assert a[a.index("-lm") + 1] == "none" and a[a.index("-ngl") + 1] == "99"
for p in (128, 512):
    print(json.dumps({{"n_prompt": p, "n_gen": 0, "avg_ts": 1000.0 * p / 128 - ncmoe, "n_cpu_moe": ncmoe}}))
print(json.dumps({{"n_prompt": 0, "n_gen": 64, "avg_ts": 100.0 - ncmoe, "n_cpu_moe": ncmoe}}))
"""
BATCHED = """#!{py}
import json, sys
a = sys.argv
assert a[a.index("--output-format") + 1] == "jsonl" and a[a.index("-npl") + 1] == "16"
print("some log line", file=sys.stderr)
for p in (128, 512):
    print(json.dumps({{"pp": p, "tg": 32, "pl": 16, "speed_pp": 4000.0, "speed_tg": 150.0 + p / 128}}))
"""


def fake_bin(tmp_path):
    d = tmp_path / "bin"
    d.mkdir()
    for name, text in (("llama-bench", BENCH), ("llama-batched-bench", BATCHED)):
        f = d / name
        f.write_text(text.format(py=sys.executable))
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return d


def test_runner_writes_one_row_per_setting_from_llamacpps_json_lines(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    out = tmp_path / "llamacpp.json"
    llamacpp_bench.main(["--bin", str(fake_bin(tmp_path)), "--model", str(model), "--ncmoe", "0,9",
                         "--batched-ncmoe", "9", "--out", str(out)])
    d = json.loads(out.read_text())
    assert d["same_run"] is True and [r["batch_size"] for r in d["rows"]] == [1, 1, 16]
    one = d["rows"][1]
    assert one["ncmoe"] == 9 and one["prefill_tok_s"] == {"128": 991.0, "512": 3991.0} and one["decode_tok_s"] == 91.0
    assert d["rows"][2]["decode_tok_s"] == {"128": 151.0, "512": 154.0}


def test_each_llamacpp_setting_goes_to_the_smallest_budget_its_peak_fits(tmp_path):
    rows = [{"setting": s, "ncmoe": n, "peak_gpu_gib": p, "batch_size": 1, "prefill_tok_s": {"128": 1000.0},
             "decode_tok_s": 90.0 - n} for s, n, p in (("a", 0, 10.7), ("b", 9, 7.9), ("c", 13, 6.6), ("d", 15, 5.9),
                                                       ("e", 21, 3.8), ("f", 22, None))]
    (tmp_path / "llamacpp.json").write_text(json.dumps({"same_run": True, "rows": rows[:2] + rows[5:]}))
    (tmp_path / "llamacpp_small.json").write_text(json.dumps({"same_run": True, "rows": rows[2:5]}))   # more settings
    bf16 = [{**rows[0], "setting": "bf16", "ncmoe": 0, "peak_gpu_gib": 3.0}]
    (tmp_path / "llamacpp_bf16.json").write_text(json.dumps({"same_run": True, "rows": bf16}))  # other weights: not read
    placed = {r["gpu_budget_gib"]: r["setting"] for r in quant_results.llamacpp(tmp_path, [4.0, 6.0, 8.0, 12.0])}
    assert placed == {4.0: "e", 6.0: "d", 8.0: "b", 12.0: "a"}            # fewest experts on the CPU that fit

"""The evaluation sweep runs end to end on the tiny checkpoint: schema, plots, resume, failed cells recorded, and
nothing reported from another setting: rows keyed by everything that defines them, references by checkpoint,
atomic files, no job left running when the sweep is killed."""
import csv
import json
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from conftest import ROOT
from hybrid.model.checkpoint import Checkpoint
from hybrid.model.synthetic import PRESETS, write_checkpoint

SWEEP = ROOT / "eval" / "compare_modes.py"


def command(model, out, modes, *extra):
    return [sys.executable, str(SWEEP), "--model", str(model), "--modes", modes, "--batch-sizes", "1",
            "--prompt-lens", "12,20", "--new-tokens", "4", "--out-dir", str(out), "--tokenizer", "bytes", *extra]


def sweep(model, out, modes, *extra):
    return subprocess.run(command(model, out, modes, *extra), capture_output=True, text=True, timeout=600, cwd=ROOT)


def rows(out):
    return json.loads((out / "results.json").read_text())["rows"]


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """The tiny checkpoint's layout with other weights (seed 2): only the values differ."""
    config, shards = PRESETS["tiny"]
    return write_checkpoint(tmp_path_factory.mktemp("other"), config, shards, seed=2, progress=False)


def test_sweep_writes_json_csv_and_plots_and_resumes(tiny, tmp_path):
    r = sweep(tiny, tmp_path, "hybrid,fetch+mlp")        # fetch+mlp fails: no trained predictors for this model
    assert r.returncode == 0, r.stderr
    d = json.loads((tmp_path / "results.json").read_text())
    assert {"date", "command", "device", "torch", "transformers"} <= set(d["meta"])
    good = [x for x in d["rows"] if not x.get("error")]
    bad = [x for x in d["rows"] if x.get("error")]
    assert {(x["mode"], x["prompt_tokens"]) for x in good} == {("hybrid", 12), ("hybrid", 20)}
    assert len(bad) == 2 and all("needs trained predictors" in x["error"] for x in bad)
    for x in good:
        assert x["new_tokens"] == 4 and x["ttft_ms"] > 0 and x["decode_tok_s"] > 0 and 0 <= x["hit_rate"] <= 1
        assert x["ttft_first_ms"] > 0 and x["ttft_second_ms"] > 0          # the two prefills before the measured one
        assert {"tpot_ms_p50", "tpot_ms_p90", "e2e_tok_s", "peak_gpu_gib", "gb_over_pcie", "cpu_share"} <= set(x)
        assert x["checkpoint"] == Checkpoint(tiny).identity() and x["tokens_asked"] == 4
        assert x["experts"] == "bf16" and x["cache_policy"] == "lfu" and len(x["code_sha256"]) == 16
        assert x["prefill_graphs"] == "on"
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == 4
    for png in ("latency.png", "throughput.png", "traffic.png", "cost_model.png"):
        assert (tmp_path / png).stat().st_size > 1000
    again = sweep(tiny, tmp_path, "hybrid")                        # resumes: finished cells are not run again
    assert again.returncode == 0 and "skipping 2 cell(s)" in again.stderr and "hybrid:1:12" in again.stderr
    rerun = [x for x in rows(tmp_path) if not x.get("error")]
    assert [x["ttft_ms"] for x in rerun] == [x["ttft_ms"] for x in good]


def test_unknown_modes_fail_before_anything_runs(tiny, tmp_path):
    r = sweep(tiny, tmp_path, "hybrid,bogus")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: unknown mode 'bogus'")
    assert not (tmp_path / "results.json").exists()


def test_rows_of_another_checkpoint_or_setting_are_never_reused(tiny, other, tmp_path):
    assert sweep(tiny, tmp_path, "gpu,hybrid").returncode == 0
    first = rows(tmp_path)
    r = sweep(other, tmp_path, "gpu,hybrid")                       # same layout, other weights: all measured anew
    assert r.returncode == 0 and "skipping" not in r.stderr
    r = sweep(tiny, tmp_path, "hybrid", "--new-tokens", "5")       # another setting: measured anew too
    assert r.returncode == 0 and "skipping" not in r.stderr
    now = rows(tmp_path)
    ids = {x["checkpoint"] for x in now}
    assert ids == {Checkpoint(tiny).identity(), Checkpoint(other).identity()} and len(now) == len(first) * 2 + 2
    assert {x["tokens_asked"] for x in now if x["checkpoint"] == Checkpoint(tiny).identity()} == {4, 5}
    checked = [x for x in now if x["mode"] == "hybrid" and x["prompt_tokens"] == 12 and x["tokens_asked"] == 4]
    for x in checked:                  # the reference of its own checkpoint: same function, same greedy tokens
        assert x["tokens_identical_prefix"] == 4 and x["logits_rel_err_vs_gpu"] < 1e-4
    refs = sorted(p.name for p in (tmp_path / "refs").iterdir())
    assert refs == sorted(ids)


def test_reference_files_are_loaded_as_weights_only(tiny, tmp_path):
    assert sweep(tiny, tmp_path, "gpu").returncode == 0
    ref = next((tmp_path / "refs").rglob("1_12.pt"))
    torch.save({"tokens": [[1]], "logits": torch.zeros(1), "evil": object()}, ref)    # a pickled object
    r = sweep(tiny, tmp_path, "hybrid")
    bad = [x for x in rows(tmp_path) if x["mode"] == "hybrid" and x.get("error")]
    assert r.returncode == 0 and bad and "weights_only" in bad[0]["error"].lower().replace(" ", "_")


def test_a_corrupt_results_file_is_one_clear_error(tiny, tmp_path):
    (tmp_path / "results.json").write_text('{"rows": [{"mode": "gpu"')            # what a kill mid-write left
    r = sweep(tiny, tmp_path, "gpu")
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and "Traceback" not in r.stderr


def test_results_are_replaced_atomically(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "eval"))
    import common
    target = tmp_path / "results.json"
    target.write_text("old")
    monkeypatch.setattr(common.os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):                # killed between writing and renaming
        common.write_atomic(target, "new")
    assert target.read_text() == "old"


def test_a_killed_sweep_leaves_no_job_running(tiny, tmp_path):
    proc = subprocess.Popen(command(tiny, tmp_path, "hybrid"), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, children = time.time() + 120, []
    while not children and time.time() < deadline and proc.poll() is None:
        children = psutil.Process(proc.pid).children()
        time.sleep(0.05)
    assert children, "the sweep started no job"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(children, timeout=20)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]


def test_results_name_the_host_state_and_the_host_probe_times_small_steps():
    sys.path.insert(0, str(ROOT / "eval"))
    from common import meta
    m = meta()
    assert len(m["loadavg"]) == 3 and (m["cpu_mhz_mean"] is None or m["cpu_mhz_mean"] > 0)
    out = subprocess.run([sys.executable, str(ROOT / "eval" / "probes" / "host_speed.py"), "--line"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("host: ")
    host = json.loads(out[len("host: "):])
    assert all(host[k] > 0 for k in ("python_plan_us", "numpy_routing_us", "torch_index_select_us"))


def test_cells_with_prefill_graphs_off_run_every_prefill_eagerly(tiny):
    """--prefill-graphs off (the TTFT of a prompt of a new length): the cell's engine keeps no prefill graphs."""
    from types import SimpleNamespace
    sys.path.insert(0, str(ROOT / "eval"))
    from cells import make_engine
    a = SimpleNamespace(model=str(tiny), experts="bf16", gpu_memory=None, cache_policy="lfu", cache_layout="auto",
                        prefill_graphs="off")
    e = make_engine(a, "hybrid", 1, 64)
    assert e.run.prefill_graph_tokens == 0 and e.prefiller is None


def test_the_sweeps_budget_applies_to_every_mode_but_the_resident_ones():
    """Offload modes, mode auto and accelerate run at --gpu-memory or 12 GiB; mode gpu and transformers without a
    budget (the fifteenth lease's `--modes gpu --gpu-memory 11.5GiB` was the resident cell: mode auto is the one
    that picks the resident step within a budget); each row's settings name the budget its cell ran under."""
    from types import SimpleNamespace
    sys.path.insert(0, str(ROOT / "eval"))
    from cells import OFFLOAD_BUDGET, cell_budget
    from compare_modes import job_settings
    modes = ("gpu", "auto", "hybrid+gate", "transformers", "transformers+accelerate")
    given, unset = SimpleNamespace(gpu_memory=11 * 2**30), SimpleNamespace(gpu_memory=None)
    assert [cell_budget(given, m) for m in modes] == [None, 11 * 2**30, 11 * 2**30, None, 11 * 2**30]
    assert [cell_budget(unset, m) for m in modes] == [None, OFFLOAD_BUDGET, OFFLOAD_BUDGET, None, OFFLOAD_BUDGET]
    a = SimpleNamespace(gpu_memory=11 * 2**30, new_tokens=8, peer_new_tokens=4, accelerate_new_tokens=2,
                        cache_policy="lfu", cache_layout="auto", experts="q4k", prefill_graphs="on")
    assert [job_settings(a, m, "ckpt", "code")["gpu_budget_gib"] for m in ("gpu", "auto")] == [None, 11.0]


def test_a_sweep_cell_of_mode_auto_says_what_it_ran_as(tiny, tmp_path):
    r = sweep(tiny, tmp_path, "auto")
    assert r.returncode == 0, r.stderr[-800:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert rows and all(row["mode"] == "auto" and row["ran_as"] == "gpu" for row in rows)


def test_the_prefill_traces_host_op_ranking_counts_the_driving_threads_ops_inside_each_window():
    sys.path.insert(0, str(ROOT / "eval" / "probes"))
    from prefill_trace import host_ops
    op = lambda ts, dur, name, tid=1, cat="cpu_op": {"ph": "X", "ts": ts, "dur": dur, "name": name, "tid": tid,  # noqa
                                                      "cat": cat}
    events = [{"name": "prefill_trace_mark", "tid": 1}, op(10, 5, "a"), op(12, 1, "launch", cat="cuda_runtime"),
              op(30, 9, "outside"), op(52, 4, "a"), op(53, 50, "other thread", tid=2), op(55, 2, "b", cat="kernel")]
    res = host_ops(events, [(0, 20), (50, 60)])
    ranked = {(t["cat"], t["name"]): (t["ms_per_layer"], t["calls_per_layer"]) for t in res["top"]}
    assert ranked == {("cpu_op", "a"): (0.0045, 1.0), ("cuda_runtime", "launch"): (0.0005, 0.5)}
    assert res["layers"] == 2 and res["mean_window_ms"] == 0.015 and host_ops(events, []) == {}


def test_the_prefill_traces_timeline_keeps_the_lane_notes_apart_from_the_host_timestamps():
    """A phase-log row holds timestamps and notes (counts, the lane state a layer planned with): only timestamps
    become ms after the routing (the thirteenth lease's traces had turned the notes into times)."""
    sys.path.insert(0, str(ROOT / "eval" / "probes"))
    from prefill_trace import timeline
    rows = [{"layer": 1, "enter": 1.0, "routed": 1.001, "done": 1.003, "n_cpu": 3, "cpu_scale": 1.2,
             "backlog_ms": 0.5}, {"layer": 2, "routed": 1.005}]
    kernel = {"ph": "X", "cat": "kernel", "ts": 1.002e6, "dur": 100, "name": "k", "tid": 7}
    (row,) = timeline([kernel], rows, 0.0, which=(0,))
    assert row["host_marks_ms"] == pytest.approx({"enter": -1.0, "routed": 0.0, "done": 2.0})
    assert row["notes"] == {"n_cpu": 3, "cpu_scale": 1.2, "backlog_ms": 0.5} and row["span_ms"] == pytest.approx(4.0)
    assert [op["name"] for op in row["gpu"]] == ["k"]


def test_the_warmup_memory_probe_sums_live_blocks_by_the_projects_frame_that_allocated_them():
    sys.path.insert(0, str(ROOT / "eval" / "probes"))
    from warmup_memory import live_by_owner
    here = {"filename": "/x/hybrid/offload/layer_graph.py", "line": 70, "name": "_hits"}
    torch_frame = {"filename": "/venv/torch/functional.py", "line": 3, "name": "einsum"}
    blocks = [{"size": 3 << 30, "state": "active_allocated", "frames": [torch_frame, here]},
              {"size": 1 << 30, "state": "active_allocated", "frames": [here]},
              {"size": 5 << 30, "state": "inactive", "frames": [here]},
              {"size": 1 << 29, "state": "active_allocated", "frames": [torch_frame]}]
    rows = live_by_owner({"segments": [{"blocks": blocks[:2]}, {"blocks": blocks[2:]}]})
    assert rows == [{"owner": "offload/layer_graph.py:70 _hits", "gib": 4.0, "blocks": 2},
                    {"owner": "/venv/torch/functional.py:3", "gib": 0.5, "blocks": 1}]

"""run.py and the synthetic writer work end to end as a user calls them."""
import subprocess
import sys

import pytest

from conftest import ROOT
from hybrid.checkpoint import Checkpoint
from hybrid.synthetic import PRESETS, write_checkpoint


def run(*args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          input=stdin, timeout=600, cwd=ROOT)


def test_run_py_generates_and_reports(tiny, tmp_path):
    r = run("--model", str(tiny), "--mode", "hybrid", "--max-new-tokens", "5", "--json", str(tmp_path / "s.json"))
    assert r.returncode == 0, r.stderr
    assert "[hybrid on cpu] batch 1" in r.stdout and "peak GPU" not in r.stdout and "tok/s" in r.stdout
    assert '"decode_tok_s"' in (tmp_path / "s.json").read_text()


def test_run_py_chat_reads_turns_from_stdin(tiny, tokenizer_dir):
    r = run("--model", str(tiny), "--chat", "--max-new-tokens", "3", "--tokenizer", str(tokenizer_dir),
            stdin="hello\nand again\n\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant>") == 2


def test_synthetic_is_deterministic_and_copies_the_tokenizer(tmp_path, tokenizer_dir):
    config, shards = PRESETS["tiny"]
    a = write_checkpoint(tmp_path / "a", config, shards, seed=7, progress=False, tokenizer=tokenizer_dir)
    b = write_checkpoint(tmp_path / "b", config, shards, seed=7, progress=False)
    for f in sorted(a.glob("*.safetensors")):
        assert f.read_bytes() == (b / f.name).read_bytes()
    assert (a / "tokenizer.json").exists()
    ck = Checkpoint(a)
    assert ck.dtypes["lm_head.weight"] == "BF16" and len(ck.shapes) == len(ck.weight_map)


@pytest.mark.parametrize("module", ["hybrid.synthetic"])
def test_module_entry_point_help(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--preset" in r.stdout

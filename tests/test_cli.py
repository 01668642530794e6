"""run.py and the synthetic writer work end to end as a user calls them."""
import subprocess
import sys

import pytest

from conftest import ROOT
from hybrid.model.checkpoint import Checkpoint
from hybrid.model.synthetic import PRESETS, write_checkpoint


def run(*args, stdin=None):
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True, text=True,
                          input=stdin, timeout=600, cwd=ROOT)


def test_run_py_generates_and_reports(tiny, tmp_path):
    r = run("--model", str(tiny), "--mode", "hybrid", "--max-new-tokens", "5", "--json", str(tmp_path / "s.json"),
            "--tokenizer", "bytes")
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


@pytest.mark.parametrize("module", ["hybrid.model.synthetic"])
def test_module_entry_point_help(module):
    r = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "--preset" in r.stdout


def test_default_run_says_where_the_model_is_and_what_mode_it_chose(tmp_path):
    import os
    env = {**os.environ, "HYBRID_CACHE": str(tmp_path)}
    r = subprocess.run([sys.executable, str(ROOT / "run.py"), "--device", "cpu", "--max-new-tokens", "3"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert f"wrote a small synthetic checkpoint with random weights at {tmp_path / 'synthetic-small'}" in r.stderr
    assert "mode auto: no GPU, everything resident on the CPU" in r.stderr
    assert "[resident on cpu] batch 1" in r.stdout and "GPU" not in r.stdout
    assert "tokenizer_class" not in r.stderr + r.stdout
    again = subprocess.run([sys.executable, str(ROOT / "run.py"), "--device", "cpu", "--max-new-tokens", "3"],
                           capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert f"using a small synthetic checkpoint with random weights at {tmp_path / 'synthetic-small'}" in again.stderr


def test_offload_modes_without_a_budget_say_so_in_mib(tiny):
    r = run("--model", str(tiny), "--mode", "hybrid", "--max-new-tokens", "2", "--tokenizer", "bytes")
    memory = next(line for line in r.stderr.splitlines() if line.startswith("memory:"))
    assert memory.startswith("memory: no budget (--gpu-memory not set):") and "GiB" not in memory
    cfg = Checkpoint(tiny).config
    assert "MiB" in memory and f"cache {len(cfg.moe_layers) * cfg.n_routed_experts} experts" in memory


def test_every_option_says_its_default():
    import run as run_py
    ap = run_py.parser()
    for action in ap._actions:
        if action.option_strings and action.dest != "help" and not isinstance(action.default, bool):
            assert "default" in ap._get_formatter()._get_help_string(action), action.dest


def test_the_byte_tokenizer_never_prints_control_bytes():
    from hybrid.engine.tokenizer import ByteTokenizer
    text = ByteTokenizer().decode([72, 105, 7, 27, 10, 0xC3, 0xA9, 4000])
    assert text == "Hi\\x07\\x1b\né<id 4000>"
    assert all(c.isprintable() or c == "\n" for c in text)


def test_chat_drops_the_oldest_turns_when_the_context_is_full(tiny):
    turns = "".join(f"message number {i}\n" for i in range(4)) + "x" * 80 + "\nlast one\n\n"
    r = run("--model", str(tiny), "--chat", "--max-new-tokens", "4", "--max-seq-len", "64", "--tokenizer", "bytes",
            stdin=turns)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("assistant>") == 5 and "dropped the oldest turn" in r.stdout
    assert "error: that message is" in r.stdout                  # 80 bytes alone outgrow the context: skipped


def test_chat_ends_on_eof_with_the_shell_prompt_on_its_own_line(tiny):
    r = run("--model", str(tiny), "--chat", "--max-new-tokens", "2", "--tokenizer", "bytes", stdin="hi\n")
    assert r.returncode == 0 and r.stdout.endswith("you> \n")


def read_until(proc, marker: str, timeout: float = 120) -> str:
    import os
    import select
    import time
    out, deadline = b"", time.time() + timeout
    while marker.encode() not in out and time.time() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            out += chunk
    return out.decode(errors="replace")


def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt(tiny):
    import signal
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), "--model", str(tiny), "--chat", "--tokenizer",
                             "bytes", "--max-new-tokens", "3000"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        assert "you> " in read_until(proc, "you> ")
        proc.stdin.write(b"tell me a long story\n")
        proc.stdin.flush()
        assert "assistant> " in read_until(proc, "assistant> ")
        proc.send_signal(signal.SIGINT)
        after = read_until(proc, "you> ")
        assert "(stopped)" in after and "3000 new" not in after and after.endswith("you> ")
        proc.send_signal(signal.SIGINT)                                  # at the prompt: the chat ends
        assert proc.wait(timeout=60) == 0
    finally:
        proc.kill()

"""Shared pieces of the evaluation scripts: run metadata, the prompt set, peers built on transformers."""
from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybrid.engine.promptset import prompt_ids as load_prompts  # noqa: E402,F401  (re-exported for the eval scripts)
DEFAULT_PROMPTS = ROOT / "eval" / "prompts.jsonl"


def code_digest() -> str:
    """SHA-256 over the project's sources (Python, the C++ kernel): names the code that ran even where .git is
    stale (the device machine gets the working tree with the session's first .git)."""
    import hashlib
    h = hashlib.sha256()
    files = sorted(ROOT.glob("*.py"))
    for folder in ("hybrid", "cost_model", "eval"):
        files += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".cpp", ".h"))
    for f in files:
        h.update(str(f.relative_to(ROOT)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename: a reader (or a kill) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(out_dir: Path, rows: list[dict], fields: list[str]) -> None:
    """results.json (rows and this run's metadata) and results.csv (the named fields) in out_dir, atomically."""
    import csv
    import io
    import json
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "results.json", json.dumps({"meta": meta(), "rows": rows}, indent=1))
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    write_atomic(out_dir / "results.csv", text.getvalue())


def die_with_parent() -> None:
    """For subprocess's preexec_fn: the child is killed when the process that started it dies, even by SIGKILL,
    so a killed sweep leaves no job running (Linux; elsewhere nothing)."""
    import ctypes
    import signal
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)    # PR_SET_PDEATHSIG


def gpu_median_ms(fn, reps: int = 50, graph: bool = True) -> float:
    """Median GPU time of one call of fn() (replayed from a CUDA graph if `graph`), each call timed alone."""
    import statistics
    fn()
    torch.cuda.synchronize()
    run = fn
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        run = g.replay
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def meta() -> dict:
    import transformers
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    except OSError:
        commit = ""
    return {"code_sha256": code_digest(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name] + sys.argv), "commit": commit,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_mhz_mean": cpu_mhz(), "loadavg": list(os.getloadavg())}


def cpu_mhz() -> float | None:
    """The mean clock of the host's CPUs now (/proc/cpuinfo), None where that is not readable."""
    try:
        mhz = [float(line.split(":")[1]) for line in Path("/proc/cpuinfo").read_text().splitlines()
               if line.startswith("cpu MHz")]
    except (OSError, ValueError, IndexError):
        return None
    return round(sum(mhz) / len(mhz), 1) if mhz else None


def hf_peer(model_dir: str, prompts: list[list[int]], new_tokens: int, max_memory: dict | None = None) -> dict:
    """transformers DeepseekV2ForCausalLM: all on the GPU, or dispatched by accelerate within max_memory."""
    from transformers import AutoModelForCausalLM
    kw = {"device_map": "cuda"} if max_memory is None else {"device_map": "auto", "max_memory": max_memory}
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **kw).eval()
    load_s = time.perf_counter() - t
    ids = torch.tensor(prompts, device="cuda")

    def gen(n: int) -> float:
        torch.cuda.synchronize()
        s = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - s
    gen(2)
    torch.cuda.reset_peak_memory_stats()
    t1, tn = gen(1), gen(new_tokens)
    B, L = ids.shape
    row = {"mode": "transformers" + ("" if max_memory is None else "+accelerate"), "batch_size": B,
           "prompt_tokens": L, "new_tokens": new_tokens, "ttft_ms": 1000 * t1,
           "tpot_ms_mean": 1000 * (tn - t1) / (new_tokens - 1), "decode_tok_s": B * (new_tokens - 1) / (tn - t1),
           "prefill_tok_s": B * L / t1, "peak_gpu_gib": torch.cuda.max_memory_reserved() / 2**30, "load_s": load_s}
    del model
    torch.cuda.empty_cache()
    return row


def probe_args(ap, prompt_len: int = 128) -> None:
    """The options of the single-engine probes (profile_layers, piece_times): the engine's, plus prompts and output."""
    from hybrid.engine.cli import engine_args
    engine_args(ap)
    ap.add_argument("--prompt-len", type=int, default=prompt_len)
    ap.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    ap.add_argument("--out", default=None)


def probe_engine(a):
    """-> (engine, one batch of prompts cut to --prompt-len) for a probe's parsed options."""
    from hybrid.engine.cli import default_model, make_engine
    from hybrid.engine.tokenizer import load_tokenizer
    a.model = a.model or str(default_model()[0])
    engine = make_engine(a)
    return engine, load_prompts(a.prompts, load_tokenizer(engine.ckpt.path), a.prompt_len, a.batch_size)


class PeakGpu:
    """The largest `nvidia-smi` memory.used (GiB) seen while the block runs; None without nvidia-smi."""

    def __init__(self, every_s: float = 0.1):
        self.every_s, self.peak, self.stop = every_s, None, threading.Event()
        self.smi = shutil.which("nvidia-smi")

    def _sample(self) -> None:
        while not self.stop.wait(self.every_s):
            out = subprocess.run([self.smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True).stdout.split()
            if out:
                self.peak = max(self.peak or 0.0, float(out[0]) / 1024)

    def __enter__(self) -> "PeakGpu":
        if self.smi:
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        if self.smi:
            self.thread.join()

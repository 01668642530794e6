"""What the server's GPU memory holds after its warm-up, by where each live block was allocated. Builds the server
as serve.py does (its own arguments after `--`), records the CUDA caching allocator's history, runs the warm-up
(a joint prefill of a full batch, a decode step at every batch size), and, whether it finishes or runs out of
memory, sums the live blocks by the first frame of this project that allocated them. Against the memory plan it
prints: which tensors sit outside the plan (the twelfth lease's server held ~0.7 GiB more than planned when its
warm-up ran out of 8 GiB), and the memory outside torch's allocator after loading and after each decode step's
capture, with the graphs made so far (the thirteenth lease's server peaked at 8.32-8.40 GiB by nvidia-smi while
torch held 7.29: kernel modules or graph executables, which the plan counts only as the context measured at
start). One JSON object; CUDA only.

    python eval/probes/warmup_memory.py --out mem.json -- --model FILE.gguf --gpu-memory 8GiB --max-batch-size 16"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from eval.common import meta  # noqa: E402

GiB = 2**30


def owner(frames: list[dict]) -> str:
    """The innermost frame of this project's code (hybrid/, serve.py), as file:line function; else the first."""
    for f in frames:
        name = f.get("filename", "")
        if "/hybrid/" in name or name.endswith("serve.py"):
            return f"{name.split('/hybrid/')[-1]}:{f.get('line')} {f.get('name')}"
    return f"{frames[0].get('filename', '?')}:{frames[0].get('line')}" if frames else "(no stack recorded)"


def live_by_owner(snapshot: dict, top: int = 25) -> list[dict]:
    """Live blocks of a torch.cuda.memory._snapshot() summed by owner(), largest first."""
    total: dict[str, list] = {}
    for seg in snapshot.get("segments", []):
        for b in seg.get("blocks", []):
            if b.get("state") != "active_allocated":
                continue
            t = total.setdefault(owner(b.get("frames", [])), [0, 0])
            t[0] += b.get("size", 0)
            t[1] += 1
    ranked = sorted(total.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"owner": k, "gib": v[0] / GiB, "blocks": v[1]} for k, v in ranked]


def outside_allocator() -> int:
    from hybrid.offload.runtime import outside_allocator_bytes
    return outside_allocator_bytes(torch.device("cuda"))


def watch_captures(log: list[dict]) -> None:
    """Log the memory outside the allocator and the graphs made so far after each decode step's capture."""
    from hybrid.engine import graphs
    made = [0]
    end = torch.cuda.CUDAGraph.capture_end

    def counted(self, *a, **k):
        made[0] += 1
        return end(self, *a, **k)
    torch.cuda.CUDAGraph.capture_end = counted
    capture = graphs.StaticStep._capture

    def logged(self):
        capture(self)
        log.append({"batch": self.x.shape[0], "graphs": made[0], "outside_gib": outside_allocator() / GiB,
                    "reserved_gib": torch.cuda.memory_reserved() / GiB})
    graphs.StaticStep._capture = logged


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="JSON file")
    a = ap.parse_args(argv[:cut])
    if not torch.cuda.is_available():
        sys.exit("warmup_memory needs a CUDA GPU")
    import serve
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=200_000)   # every live block's stack
    captures: list[dict] = []
    watch_captures(captures)
    _, batcher, _, _, key = serve.build(argv[cut + 1:])
    loaded, outside_loaded = torch.cuda.memory_allocated() / GiB, outside_allocator() / GiB
    error = None
    try:
        batcher.warm_up()
    except torch.OutOfMemoryError as e:
        error = str(e).splitlines()[0]
    res = {**meta(), "serve_args": argv[cut + 1:], "error": error, "allocated_after_load_gib": loaded,
           "allocated_gib": torch.cuda.memory_allocated() / GiB,
           "max_reserved_gib": torch.cuda.max_memory_reserved() / GiB,
           "context_start_gib": batcher.engine.context_start / GiB,
           "context_planned_gib": batcher.engine.context_bytes / GiB, "outside_after_load_gib": outside_loaded,
           "outside_gib": outside_allocator() / GiB, "captures": captures,
           "live": live_by_owner(torch.cuda.memory._snapshot())}
    print(f"after load {loaded:.2f} GiB allocated; after the warm-up {res['allocated_gib']:.2f} "
          f"(peak reserved {res['max_reserved_gib']:.2f}){'; ' + error if error else ''}")
    print(f"outside the allocator: planned {res['context_planned_gib']:.3f} GiB, after load {outside_loaded:.3f}, "
          f"after the warm-up {res['outside_gib']:.3f}")
    if error is None:        # what the setting grew outside the allocator: stored for the next start's plan
        print(serve.device_memory(batcher.engine, key))
    for c in captures:
        print(f"  batch {c['batch']:3d}: {c['graphs']:5d} graphs, outside {c['outside_gib']:.3f} GiB, "
              f"reserved {c['reserved_gib']:.3f}")
    for row in res["live"][:8]:
        print(f"  {row['gib']:7.3f} GiB {row['blocks']:6d} blocks  {row['owner']}")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    from hybrid.engine.errors import friendly
    friendly(main)

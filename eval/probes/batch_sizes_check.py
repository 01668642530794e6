"""Does continuous batching compute on the GPU what each sequence computes alone? The CPU tests check it without
CUDA graphs; here the decode steps of every batch size replay from graphs that share one memory pool
(engine/graphs.DecodeRunner), in mode gpu and offloaded (hybrid with 6 cache slots: the layer graphs too), on the
small synthetic model in float32. Sequences join and leave a running batch (engine/slots.py) so that the batch size
goes up and down, and each one's greedy tokens are compared with the same prompt generated alone; and hybrid's
prompts alone with mode gpu's (its expert copies and CPU experts compute the same function). One JSON object; exit 1
on a mismatch.

    python eval/probes/batch_sizes_check.py [--out check.json]"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import torch  # noqa: E402

from eval.common import meta  # noqa: E402
from hybrid.engine.engine import Engine  # noqa: E402
from hybrid.engine.sampling import SamplingParams  # noqa: E402
from hybrid.engine.slots import Slots  # noqa: E402
from hybrid.model.config import RunConfig  # noqa: E402
from hybrid.model.synthetic import PRESETS, write_checkpoint  # noqa: E402

PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], list(range(1, 25)), [42], [7] * 12, [3, 1, 4, 1, 5], [11] * 30, [8, 9]]
NEW = [10, 12, 6, 15, 8, 9, 11, 5]


def batched(e: Engine, prompts: list[list[int]], new: list[int], per_join=lambda step: 2):
    """Every prompt through one Slots: `per_join(step)` of them join every other step while they fit, each leaves
    after its `new` tokens. -> greedy tokens per prompt, the batch size of every step, the size of every join."""
    slots, out, row_of, todo, sizes, joins = Slots(e), {}, {}, list(range(len(prompts))), [], []
    for step in range(400):
        k = per_join(step)
        if todo and step % 2 == 0 and slots.fits([len(prompts[i]) for i in todo[:k]], [new[i] for i in todo[:k]]):
            joining, todo = todo[:k], todo[k:]
            joins.append(len(joining))
            r0, logits = slots.join([prompts[i] for i in joining], [new[i] for i in joining])
            for j, i in enumerate(joining):
                row_of[r0 + j], out[i] = i, [int(logits[j].argmax())]
        if slots.n:
            sizes.append(slots.n)
            logits = slots.step([out[row_of[r]][-1] for r in range(slots.n)])
            for r in range(slots.n):
                out[row_of[r]].append(int(logits[r].argmax()))
            for r in reversed(range(slots.n)):
                if len(out[row_of[r]]) >= new[row_of[r]]:
                    moved = slots.leave(r)
                    row_of[r] = row_of[moved]
        if not todo and slots.n == 0:
            break
    return [out[i][:new[i]] for i in range(len(prompts))], sizes, joins


def check(model: Path, mode: str, device: str) -> dict:
    """Mode gpu, or hybrid with 6 cache slots (most experts offloaded), on `device`."""
    run = RunConfig(device=device, dtype="float32", mode=mode, max_batch_size=4, max_seq_len=64,
                    cache_slots=6 if mode == "hybrid" else None, prefill_graph_tokens=0)
    alone_e = Engine(str(model), run, progress=False)
    alone = [alone_e.generate([p], SamplingParams(n, stop_on_eos=False)).tokens[0] for p, n in zip(PROMPTS, NEW)]
    del alone_e
    e = Engine(str(model), run, progress=False)
    out, sizes, _ = batched(e, PROMPTS, NEW)
    same = [out[i] == alone[i] for i in range(len(PROMPTS))]
    return {"mode": mode, "batch_sizes_stepped": sorted(set(sizes)), "steps": len(sizes),
            "graphs_captured": sorted(e.decoder.steps) if e.decoder is not None else [],
            "identical": all(same), "identical_per_prompt": same, "alone": alone}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--device", default="cuda", help="cuda (graphs), or cpu to try the harness (no graphs)")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: --device cpu runs the same without graphs (as the tests do)")
    with tempfile.TemporaryDirectory() as d:
        config, shards = PRESETS["small"]              # rows of 128 and more, as the GPU kernels expect
        model = write_checkpoint(d, config, shards, seed=1, progress=False)
        rows = [check(model, "gpu", a.device), check(model, "hybrid", a.device)]
    modes_agree = rows[0]["alone"] == rows[1]["alone"]        # the offloaded copies and CPU experts: the same tokens
    report = {**meta(), "rows": rows, "hybrid_alone_equals_gpu_alone": modes_agree}
    for r in rows:
        print(f"{r['mode']:7s} batch sizes {r['batch_sizes_stepped']} over {r['steps']} steps, graphs "
              f"{r['graphs_captured']}: {'identical' if r['identical'] else 'DIFFERENT'} to each prompt alone")
    print(f"hybrid alone {'equals' if modes_agree else 'DIFFERS FROM'} gpu alone (greedy tokens of every prompt)")
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=2))
    sys.exit(0 if all(r["identical"] for r in rows) and modes_agree else 1)


if __name__ == "__main__":
    main()

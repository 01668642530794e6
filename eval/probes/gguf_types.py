"""Which block types a GGUF file holds, by tensor kind, and what that leaves in GPU memory while offloading: the
non-expert weights at bf16 against with the shared experts, dense MLP, attention projections and output head kept
in the file's blocks where a plane kind takes them. No GPU needed.

    python eval/probes/gguf_types.py FILE.gguf [--out types.json]"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hybrid.model.gguf_checkpoint import GgufCheckpoint  # noqa: E402
from hybrid.model.layout import device_weight_numel  # noqa: E402
from hybrid.offload.runtime import device_weight_bytes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a deepseek2 .gguf file")
    ap.add_argument("--out", help="JSON with the same figures")
    a = ap.parse_args()
    ckpt = GgufCheckpoint(a.model)
    kinds: dict[str, Counter] = {}
    for name, t in ckpt.tensors.items():
        kind = re.sub(r"^blk\.\d+\.", "", name)
        kinds.setdefault(kind, Counter())[t.tensor_type.name] += 1
    bf16 = device_weight_numel(ckpt.config) * 2
    kept = device_weight_bytes(ckpt.config, ckpt, 2)
    for kind, types in sorted(kinds.items()):
        print(f"{kind:28s} {', '.join(f'{t} x{n}' for t, n in sorted(types.items()))}")
    print(f"non-expert weights on the GPU while offloading: {kept / 2**30:.2f} GiB (all bf16: {bf16 / 2**30:.2f})")
    if a.out:
        Path(a.out).write_text(json.dumps({"types": {k: dict(v) for k, v in kinds.items()},
                                           "device_weight_bytes": kept, "all_bf16_bytes": bf16}, indent=1))


if __name__ == "__main__":
    main()

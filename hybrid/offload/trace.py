"""Routing traces: per MoE layer and token, the hidden state entering the layer and the experts chosen.

File format (`.npz`, one per trace): for each MoE layer L, `x_L` float16 [N, Hd] (the MoE input of the real tokens,
in forward order) and `idx_L` int16 [N, K] (the routed experts); `layers` int32 [n_layers]; `seq` int32 [N] (which
sequence each row belongs to, rows of one sequence in token order). Every layer sees the same tokens in the same
order, so row i of any two layers is the same token. Recording stops at `max_tokens` rows (bounded size:
max_tokens x n_layers x (2 Hd + 2 K) bytes; 4096 tokens of V2-Lite take 0.44 GB)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class TraceRecorder:
    """An ExpertBackend wrapper that records every MoE call, then delegates (eager only: no CUDA graph)."""
    capturable = False

    def __init__(self, inner, max_tokens: int = 4096):
        self.inner, self.max_tokens = inner, max_tokens
        self.x: dict[int, list[np.ndarray]] = {}
        self.idx: dict[int, list[np.ndarray]] = {}
        self.seq: list[np.ndarray] = []
        self.count: dict[int, int] = {}
        self.first = None
        self.row_seq: np.ndarray | None = None

    def set_rows(self, seq_ids: np.ndarray) -> None:
        """Which sequence each real token of the next forward belongs to (set by the engine)."""
        self.row_seq = seq_ids

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward(self, call) -> torch.Tensor:
        if self.first is None:
            self.first = call.layer
        n = self.count.get(call.layer, 0)
        if n < self.max_tokens:
            take = min(call.x.shape[0], self.max_tokens - n)
            self.count[call.layer] = n + take
            self.x.setdefault(call.layer, []).append(call.x[:take].to(torch.float16).cpu().numpy())
            self.idx.setdefault(call.layer, []).append(call.idx[:take].to(torch.int16).cpu().numpy())
            if call.layer == self.first:
                rows = self.row_seq if self.row_seq is not None else np.zeros(call.x.shape[0], np.int32)
                self.seq.append(rows[:take].astype(np.int32))
        return self.inner.forward(call)

    def save(self, path: str | Path) -> Path:
        layers = sorted(self.x)
        arrays = {f"x_{L}": np.concatenate(self.x[L]) for L in layers}
        arrays.update({f"idx_{L}": np.concatenate(self.idx[L]) for L in layers})
        n = min(len(arrays[f"x_{L}"]) for L in layers)
        arrays = {k: v[:n] for k, v in arrays.items()}
        np.savez(path, layers=np.array(layers, dtype=np.int32), seq=np.concatenate(self.seq)[:n], **arrays)
        return Path(path)


def load_trace(path: str | Path) -> dict:
    d = np.load(path)
    layers = [int(L) for L in d["layers"]]
    return {"layers": layers, "seq": d["seq"], "x": {L: d[f"x_{L}"] for L in layers},
            "idx": {L: d[f"idx_{L}"].astype(np.int64) for L in layers}}

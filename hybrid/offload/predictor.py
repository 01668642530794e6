"""Trained expert predictors: at MoE layer L, a small MLP predicts the experts layer L+k will route to.

    python -m hybrid.offload.predictor train --model DIR --trace T.npz --k 1,2,3     # saves next to the calibration data
    python -m hybrid.offload.predictor eval  --model DIR --trace HELDOUT.npz --out R.json [--plot R.png]
The k=1 predictor drives `--prefetch mlp`. Evaluation compares it with the next layer's router applied early
(`gate`) and with "the same experts as the previous token" on held-out sequences."""
from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..model.gguf_checkpoint import open_checkpoint
from ..model.config import cache_dir
from .trace import load_trace


class ExpertMLP(torch.nn.Module):
    """Scores for layer L+k's experts from layer L's MoE input: the target layer's router (frozen), rescaled and
    shifted, plus a small MLP correction that starts at zero, so training begins from the router's own guess."""

    def __init__(self, router: torch.Tensor, width: int = 256):
        super().__init__()
        experts, hidden = router.shape
        self.register_buffer("router", router.float().clone())                          # [E, Hd]
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.bias = torch.nn.Parameter(torch.zeros(experts))
        self.net = torch.nn.Sequential(torch.nn.Linear(hidden, width), torch.nn.SiLU(), torch.nn.Linear(width, experts))
        torch.nn.init.zeros_(self.net[2].weight)
        torch.nn.init.zeros_(self.net[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, Hd] -> expert scores [T, E] (higher = more likely routed)."""
        x = x.float()
        return self.scale * F.linear(x, self.router) + self.bias + self.net(x)


def checkpoint_key(model_dir: str | Path) -> str:
    return open_checkpoint(model_dir).identity()


def default_path(model_dir: str | Path) -> Path:
    return cache_dir() / "predictors" / f"{checkpoint_key(model_dir)}.pt"


def multi_hot(idx: np.ndarray, experts: int) -> torch.Tensor:
    y = torch.zeros(idx.shape[0], experts)
    return y.scatter_(1, torch.from_numpy(idx), 1.0)


def split_rows(seq: np.ndarray, val_share: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """Train / validation rows by whole sequences (the last ones validate); by rows if there is one sequence."""
    ids = np.unique(seq)
    if len(ids) > 1:
        val = np.isin(seq, ids[-max(1, int(round(len(ids) * val_share))):])
    else:
        val = np.arange(len(seq)) >= int(len(seq) * (1 - val_share))
    return np.flatnonzero(~val), np.flatnonzero(val)


def fit(model: "ExpertMLP", x: torch.Tensor, y: torch.Tensor, val: tuple, epochs: int,
        gen: torch.Generator | None = None) -> "ExpertMLP":
    """Adam on binary cross-entropy, keeping the state with the best validation recall (the start included);
    batches shuffled with `gen`."""
    xv, idx_v = val
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-4)
    with torch.no_grad():
        best, state = recall_at_k(model(xv).cpu(), idx_v), copy.deepcopy(model.state_dict())
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=gen).to(x.device).split(256):
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(model(x[batch]), y[batch]).backward()
            opt.step()
        with torch.no_grad():
            r = recall_at_k(model(xv).cpu(), idx_v)
        if r > best:
            best, state = r, copy.deepcopy(model.state_dict())
    model.load_state_dict(state)
    return model


def train(trace: dict, routers: dict[int, torch.Tensor], ks: list[int], epochs: int = 40, device: str = "cpu",
          progress: bool = True, seed: int = 0) -> dict[tuple[int, int], ExpertMLP]:
    """One predictor per (layer L, distance k) for L+k's routing, early-stopped on held-out sequences;
    initialisation and shuffling seeded (the same trace trains the same predictors)."""
    layers, out = trace["layers"], {}
    tr, va = split_rows(trace["seq"])
    pairs = [(L, k) for k in ks for i, L in enumerate(layers) if i + k < len(layers)]
    for i, (L, k) in enumerate(tqdm(pairs, desc="training predictors", disable=not progress)):
        x = torch.from_numpy(trace["x"][L]).float().to(device)
        target = layers[layers.index(L) + k]
        y = multi_hot(trace["idx"][target], routers[target].shape[0]).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            model = ExpertMLP(routers[target]).to(device)
        gen = torch.Generator().manual_seed(seed + i)
        out[(L, k)] = fit(model, x[tr], y[tr], (x[va], trace["idx"][target][va]), epochs, gen).cpu().eval()
    return out


def recall_at_k(scores: torch.Tensor, actual: np.ndarray) -> float:
    pred = scores.topk(actual.shape[1], dim=-1).indices.numpy()
    return float(np.mean([len(set(p) & set(a)) / len(a) for p, a in zip(pred, actual)]))


def precision_at_half(scores: torch.Tensor, actual: np.ndarray) -> tuple[float, float]:
    """Precision and mean size of the set {e : sigmoid(score) > 0.5} (top-1 if empty)."""
    chosen = torch.sigmoid(scores) > 0.5
    chosen[torch.arange(len(chosen)), scores.argmax(-1)] = True
    hits = [len(set(np.flatnonzero(c.numpy())) & set(a)) for c, a in zip(chosen, actual)]
    return float(np.sum(hits) / chosen.sum().item()), float(chosen.sum(-1).float().mean())


def previous_token(trace: dict, L: int) -> float:
    """Recall of 'the same experts as the previous token of the same sequence'."""
    idx, seq = trace["idx"][L], trace["seq"]
    same = [len(set(idx[i]) & set(idx[i - 1])) / idx.shape[1] for i in range(1, len(idx)) if seq[i] == seq[i - 1]]
    return float(np.mean(same)) if same else float("nan")


@torch.no_grad()
def evaluate(trace: dict, predictors: dict, routers: dict[int, torch.Tensor]) -> list[dict]:
    layers, rows = trace["layers"], []
    for i, L in enumerate(layers[:-1]):
        x = torch.from_numpy(trace["x"][L]).float()
        nxt = trace["idx"][layers[i + 1]]
        row = {"layer": L, "gate_k1": recall_at_k(F.linear(x, routers[layers[i + 1]]), nxt),
               "prev_token": previous_token(trace, layers[i + 1])}
        for (pl, k), model in predictors.items():
            if pl == L:
                row[f"mlp_k{k}"] = recall_at_k(model(x), trace["idx"][layers[i + k]])
                if k == 1:
                    row["mlp_k1_precision"], row["mlp_k1_set_size"] = precision_at_half(model(x), nxt)
        rows.append(row)
    return rows


def save(path: Path, predictors: dict, key: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"checkpoint": key, "models": {f"{L}:{k}": m.state_dict() for (L, k), m in predictors.items()}},
               path)
    return path


def load(path: Path, key: str | None) -> dict[tuple[int, int], ExpertMLP]:
    d = torch.load(path, weights_only=True)
    if key is not None and d["checkpoint"] != key:
        raise ValueError(f"predictors in {path} were trained for another checkpoint ({d['checkpoint']} != {key})")
    out = {}
    for name, state in d["models"].items():
        L, k = (int(v) for v in name.split(":"))
        m = ExpertMLP(state["router"])
        m.load_state_dict(state)
        out[(L, k)] = m.eval()
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["train", "eval"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--k", default="1,2,3")
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--predictors", help="predictor file (default: next to the calibration data)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="eval: JSON table")
    ap.add_argument("--plot", help="eval: PNG of recall per layer")
    a = ap.parse_args(argv)
    ck = open_checkpoint(a.model)
    key = checkpoint_key(a.model)
    path = Path(a.predictors) if a.predictors else default_path(a.model)
    trace = load_trace(a.trace)
    routers = {L: ck.get(f"model.layers.{L}.mlp.gate.weight").float() for L in trace["layers"]}
    if a.command == "train":
        preds = train(trace, routers, [int(k) for k in a.k.split(",")], a.epochs, a.device)
        print(f"saved {len(preds)} predictors to {save(path, preds, key)}")
        return
    rows = evaluate(trace, load(path, key), routers)
    report(rows, a.out, a.plot)


def report(rows: list[dict], out: str | None, plot: str | None) -> None:
    cols = [c for c in ("gate_k1", "mlp_k1", "mlp_k2", "mlp_k3", "prev_token", "mlp_k1_precision") if c in rows[0]]
    print("layer " + " ".join(f"{c:>16}" for c in cols))
    for r in rows:
        print(f"{r['layer']:>5} " + " ".join(f"{r.get(c, float('nan')):16.3f}" for c in cols))
    mean = {c: float(np.nanmean([r.get(c, np.nan) for r in rows])) for c in cols}
    print("mean  " + " ".join(f"{mean[c]:16.3f}" for c in cols))
    if out:
        Path(out).write_text(json.dumps({"per_layer": rows, "mean": mean}, indent=1))
    if plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4))
        for c in cols:
            if c != "mlp_k1_precision":
                ax.plot([r["layer"] for r in rows], [r.get(c, np.nan) for r in rows], marker=".", label=c)
        ax.set(xlabel="MoE layer L (predicting L+k)", ylabel="recall@top-k", title="expert prediction, held out")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=110)


if __name__ == "__main__":
    main()

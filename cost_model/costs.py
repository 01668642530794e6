"""The hybrid scheduler's cost model: per-expert PCIe, GPU and CPU times as curves over tokens. No torch here."""
from __future__ import annotations

import json
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Curve:
    """Piecewise-linear y(x) through measured points, extended linearly past both ends."""
    xs: list[float]
    ys: list[float]

    def __call__(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if len(xs) == 1:
            return ys[0]
        i = min(max(bisect_left(xs, x), 1), len(xs) - 1)
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))

    @classmethod
    def fit(cls, points: dict[float, float]) -> "Curve":
        """Isotonic (non-decreasing) least-squares fit through the measured points, by pooling adjacent
        violators: noise never makes more tokens look cheaper, and one high outlier does not lift the rest."""
        xs = sorted(points)
        blocks: list[list[float]] = []          # [mean, weight]
        for x in xs:
            blocks.append([points[x], 1.0])
            while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                (m2, w2), (m1, w1) = blocks.pop(), blocks.pop()
                blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2])
        ys = [m for m, w in blocks for _ in range(int(w))]
        return cls([float(x) for x in xs], ys)


@dataclass
class CostModel:
    """Milliseconds for one expert on each lane, as a function of the tokens routed to it."""
    fetch_ms: float                 # host -> GPU copy of one more expert (pinned, copy stream, back to back)
    gpu_ms: Curve                   # expert FFN on the GPU
    cpu_ms: Curve                   # what one more expert adds to the CPU lane (measured while PCIe is busy)
    xfer_ms: Curve                  # activations GPU -> CPU -> GPU for a number of rows
    layer_overhead_ms: float = 0.0  # routing sync and bookkeeping per MoE layer
    cpu_dispatch_ms: float = 0.0    # handing a layer's CPU work to the CPU lane and getting it back
    fetch_latency_ms: float = 0.0   # a layer's first copy on top of fetch_ms: issuing it, PCIe's start
    fingerprint: dict = field(default_factory=dict)
    source: str = "defaults"

    @classmethod
    def defaults(cls) -> "CostModel":
        """Conservative figures (an H100 box with Sapphire Rapids CPU, FACTS.md) for uncalibrated machines."""
        return cls(fetch_ms=0.33, gpu_ms=Curve([1, 512, 4096], [0.07, 0.08, 0.14]),
                   cpu_ms=Curve([1, 4, 16, 64, 512], [0.36, 0.40, 0.45, 0.70, 4.0]),
                   xfer_ms=Curve([1, 128, 4096], [0.02, 0.035, 0.4]), layer_overhead_ms=0.4, cpu_dispatch_ms=0.1)

    def pcie_ms(self, n: int, bytes_scale: float = 1.0) -> float:
        """The PCIe lane's time for n experts issued back to back (bytes_scale: their size against the
        calibrated expert's)."""
        return self.fetch_latency_ms + n * self.fetch_ms * bytes_scale if n else 0.0

    def cpu_lane_ms(self, xfer_ms: float, experts_ms: float, lag_ms: float = 0.0, scale: float = 1.0) -> float:
        """A layer's CPU lane: it starts `lag_ms` after the copies are issued, then hands the work over, moves the
        activations there and back (`xfer_ms`, from self.xfer_ms of the rows) and runs the experts (`experts_ms`,
        the sum of self.cpu_ms over them), at `scale` times the calibrated speed."""
        return lag_ms + scale * (self.cpu_dispatch_ms + xfer_ms + experts_ms)

    def to_json(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        curves = {k: Curve(**d[k]) for k in ("gpu_ms", "cpu_ms", "xfer_ms")}
        return cls(fetch_ms=float(d["fetch_ms"]), layer_overhead_ms=float(d.get("layer_overhead_ms", 0.0)),
                   cpu_dispatch_ms=float(d.get("cpu_dispatch_ms", 0.0)),
                   fetch_latency_ms=float(d.get("fetch_latency_ms", 0.0)),
                   fingerprint=dict(d.get("fingerprint", {})), source=d.get("source", "calibrated"), **curves)


def load_costs(path: str | Path | None, fingerprint: dict) -> tuple[CostModel, str]:
    """The calibration at `path` if it exists and was measured on this machine; else defaults, and why."""
    if path is None or not Path(path).exists():
        return CostModel.defaults(), f"no calibration for this machine at {path}: using conservative defaults " \
                                     "(run `python calibrate.py`)"
    try:
        model = CostModel.from_dict(json.loads(Path(path).read_text()))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return CostModel.defaults(), f"calibration {path} is unreadable ({e}): using conservative defaults"
    if model.fingerprint != fingerprint:
        diff = sorted(k for k in set(model.fingerprint) | set(fingerprint)
                      if model.fingerprint.get(k) != fingerprint.get(k))
        return CostModel.defaults(), f"calibration {path} was measured on another machine or setting (differs in " \
                                     f"{', '.join(diff)}): using conservative defaults"
    return model, f"calibration {path}"

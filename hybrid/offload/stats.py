"""Run statistics: timings, expert traffic and memory, printed as one line and saved as JSON."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .budget import size


@dataclass
class ExpertCounters:
    """What the expert runtime did; filled by the backend (zeros for the resident `gpu` mode)."""
    hits: int = 0
    misses: int = 0
    fetched: int = 0
    fetched_bytes: int = 0
    cpu_experts: int = 0
    prefetched: int = 0
    prefetch_used: int = 0
    prefetch_recall: float = 0.0
    copied_ahead: int = 0             # copies into held staging slots during the previous layer: prefill's
                                      # (planning/copy_ahead.py), and prefetches for a layer with no cache share
    copied_ahead_used: int = 0
    cpu_busy_s: float = 0.0           # wall time the CPU lane spent computing experts
    guessed_layers: int = 0           # decode layers whose output was the guess made before the routing sync
    pinned_layers: int = 0            # calls of pinned layers (every expert cached for good: no routing sync)
    layers: int = 0                   # MoE layer calls
    per_layer_hits: dict = field(default_factory=dict)
    per_layer_misses: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        n = self.hits + self.misses
        return self.hits / n if n else 1.0

    def count(self, layer: int, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses
        self.per_layer_hits[layer] = self.per_layer_hits.get(layer, 0) + hits
        self.per_layer_misses[layer] = self.per_layer_misses.get(layer, 0) + misses


@dataclass
class RunStats:
    mode: str
    batch_size: int
    prompt_tokens: int
    device: str = "cuda"              # the compute device's type: cuda | cpu
    new_tokens: int = 0
    ttft_s: float = 0.0
    step_s: list = field(default_factory=list)
    peak_gpu_bytes: int = 0
    outside_gpu_bytes: int = 0        # of the peak: device memory outside torch's allocator at the end (context+)
    experts: ExpertCounters = field(default_factory=ExpertCounters)
    layer_pred_ms: list = field(default_factory=list)
    layer_meas_ms: list = field(default_factory=list)
    layer_model_ms: list = field(default_factory=list)     # the cost model's own prediction (before the correction)

    @property
    def decode_s(self) -> float:
        return sum(self.step_s)

    @property
    def tpot_ms(self) -> float:
        return 1000 * statistics.mean(self.step_s) if self.step_s else 0.0

    @property
    def decode_tok_s(self) -> float:
        return self.batch_size * len(self.step_s) / self.decode_s if self.step_s else 0.0

    def summary(self) -> dict:
        s = sorted(self.step_s) or [0.0]
        e = self.experts
        out = {
            "mode": self.mode, "device": self.device, "batch_size": self.batch_size, "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens, "ttft_ms": 1000 * self.ttft_s, "tpot_ms_mean": self.tpot_ms,
            "tpot_ms_p50": 1000 * s[len(s) // 2], "tpot_ms_p90": 1000 * s[min(len(s) - 1, int(0.9 * len(s)))],
            "decode_tok_s": self.decode_tok_s,
            "e2e_tok_s": self.batch_size * self.new_tokens / (self.ttft_s + self.decode_s)
            if self.new_tokens else 0.0,
            "prefill_tok_s": self.batch_size * self.prompt_tokens / self.ttft_s if self.ttft_s else 0.0,
            "peak_gpu_gib": self.peak_gpu_bytes / 2**30, "outside_gpu_gib": self.outside_gpu_bytes / 2**30,
            "hit_rate": e.hit_rate,
            "experts_fetched": e.fetched, "gb_over_pcie": e.fetched_bytes / 1e9, "experts_on_cpu": e.cpu_experts,
            "cpu_share": e.cpu_experts / e.misses if e.misses else 0.0,
            "cpu_ms_per_expert": 1000 * e.cpu_busy_s / e.cpu_experts if e.cpu_experts else 0.0,
            "prefetched": e.prefetched, "prefetch_used": e.prefetch_used, "prefetch_recall": e.prefetch_recall,
            "copied_ahead": e.copied_ahead, "copied_ahead_used": e.copied_ahead_used,
            "guessed_layer_share": e.guessed_layers / e.layers if e.layers else 0.0,
            "pinned_layer_share": e.pinned_layers / e.layers if e.layers else 0.0,
        }
        if self.layer_meas_ms:
            for key, pred in (("layer_time_median_rel_err", self.layer_pred_ms),
                              ("layer_time_median_rel_err_model", self.layer_model_ms)):
                errs = sorted(abs(p - m) / m for p, m in zip(pred, self.layer_meas_ms) if m > 0)
                out[key] = errs[len(errs) // 2] if errs else None
            out["layer_pred_ms_mean"] = statistics.mean(self.layer_pred_ms)
            out["layer_meas_ms_mean"] = statistics.mean(self.layer_meas_ms)
        return out

    @property
    def label(self) -> str:
        """The mode as it ran: on a CPU device mode gpu keeps everything resident in host memory."""
        if self.device == "cuda":
            return self.mode
        return ("resident" if self.mode == "gpu" else self.mode) + " on cpu"

    def line(self) -> str:
        s = self.summary()
        head = (f"[{self.label}] batch {s['batch_size']}, prompt {s['prompt_tokens']}, {s['new_tokens']} new | "
                f"TTFT {s['ttft_ms']:.0f} ms | {s['tpot_ms_mean']:.1f} ms/token | {s['decode_tok_s']:.1f} tok/s")
        if self.mode == "gpu":
            experts = ""
        else:
            experts = (f" | hit rate {100 * s['hit_rate']:.1f}% | fetched {s['experts_fetched']} "
                       f"({s['gb_over_pcie']:.2f} GB) | on CPU {s['experts_on_cpu']}")
        peak = f" | peak GPU {size(self.peak_gpu_bytes)}" if self.device == "cuda" else ""
        return head + experts + peak

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        d = {**self.summary(), "per_layer_hits": self.experts.per_layer_hits,
             "per_layer_misses": self.experts.per_layer_misses, "step_s": self.step_s, **(extra or {})}
        Path(path).write_text(json.dumps(d, indent=2, default=str))

"""Host timestamps of each offloaded MoE layer's phases, to see what sits on a decode step's critical path.

The executor marks: enter (forward called), settled (previous layer's bookkeeping done), routed (routing on the
host: the one sync), planned, graph (the layer's graphs found), issued (copies queued), launched (rows laid out),
queued (GPU expert work and prefetch queued), cpu_call (the native call that starts the CPU lane), cpu_start /
cpu_end (the CPU experts) and done (combine queued). Off by default; marks cost ~0.1 us each."""
from __future__ import annotations

import statistics
import time

SPANS = (("enter", "routed", "wait for routing (GPU: previous layer's experts, attention, router)"),
         ("enter", "settled", "previous layer's bookkeeping (overlaps the GPU's attention piece)"),
         ("routed", "launched", "plan, copies issued, CPU work handed out"),
         ("routed", "planned", "plan"),
         ("planned", "graph", "the layer's graphs looked up"),
         ("graph", "issued", "decode: slots admitted, copies issued (before the CPU lane starts)"),
         ("routed", "cpu_start", "routing to the CPU lane's start"),
         ("cpu_call", "cpu_start", "the native call that starts the pool"),
         ("routed", "cpu_end", "routing to the CPU lane's end"),
         ("cpu_start", "launched", "rows laid out, waits for in-flight hits queued"),
         ("launched", "queued", "GPU expert groups and prefetch queued"),
         ("queued", "done", "CPU experts, combine queued"),
         ("cpu_start", "cpu_end", "CPU experts"),
         ("cpu_end", "done", "CPU results shipped, combine queued"))


MARKS = ("enter", "settled", "routed", "planned", "graph", "issued", "launched", "queued", "cpu_call", "cpu_start",
         "cpu_end", "done")          # the host timestamps (perf_counter seconds); a row's other keys are notes


class PhaseLog:
    def __init__(self, enabled: bool = False):
        self.enabled = enabled
        self.rows: list[dict] = []
        self.cur: dict = {}

    def start(self, layer: int, **counts) -> None:
        if self.enabled:
            self.cur = {"layer": layer, "enter": time.perf_counter(), **counts}
            self.rows.append(self.cur)

    def mark(self, name: str, row: dict | None = None) -> None:
        if self.enabled:
            (self.cur if row is None else row)[name] = time.perf_counter()

    def note(self, **values) -> None:
        if self.enabled:
            self.cur.update(values)

    def summary(self) -> dict:
        """Mean and median milliseconds of each span over the logged layers, the PCIe backlog the layers planned
        with, the pool's own time for the CPU experts, and the CPU lane's ms by its number of experts."""
        out = {}
        for a, b, what in SPANS:
            d = [1000 * (r[b] - r[a]) for r in self.rows if a in r and b in r]
            if d:
                out[f"{a}->{b}"] = {"what": what, "mean_ms": statistics.mean(d), "p50_ms": statistics.median(d),
                                    "layers": len(d)}
        backlog = [r["backlog_ms"] for r in self.rows if "backlog_ms" in r]
        if backlog:
            out["backlog_ms"] = {"what": "the PCIe lane's modelled backlog when the layer planned (not a span)",
                                 "mean_ms": statistics.mean(backlog), "p50_ms": statistics.median(backlog),
                                 "max_ms": max(backlog), "layers": len(backlog)}
        for key, what in (("cpu_scale", "the CPU-cost correction the layers planned with (measured / modelled)"),
                          ("cpu_lag_ms", "the CPU lane's start after the copies, as the layers planned with"),
                          ("room", "copies the decode path had room for (decode layers)")):
            v = [r[key] for r in self.rows if r.get(key) is not None]
            if v:
                out[key] = {"what": what, "mean": statistics.mean(v), "p50": statistics.median(v), "layers": len(v)}
        own = [r["cpu_lane_ms"] for r in self.rows if "cpu_lane_ms" in r]
        if own:
            out["cpu_lane_ms"] = {"what": "the pool's own time for the CPU experts (cpu_start -> cpu_end also holds "
                                          "the driving thread's way back to it)",
                                  "mean_ms": statistics.mean(own), "p50_ms": statistics.median(own),
                                  "layers": len(own)}
        lane = [(r.get("cpu_lane_ms", 1000 * (r["cpu_end"] - r["cpu_start"])), r.get("n_cpu", 0))
                for r in self.rows if "cpu_end" in r]
        by_n: dict[int, list[float]] = {}
        for ms, n in lane:
            by_n.setdefault(n, []).append(ms)
        out["cpu_ms_by_experts"] = {n: statistics.median(v) for n, v in sorted(by_n.items())}
        out["layers_logged"] = len(self.rows)
        return out

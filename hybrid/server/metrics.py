"""The server's Prometheus metrics: requests, tokens, latency histograms, the batch, and the expert runtime."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

LATENCY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30)


class Metrics:
    def __init__(self):
        disable_created_metrics()                   # no *_created series beside each counter
        r = self.registry = CollectorRegistry()
        self.requests = Counter("hybrid_requests", "Finished requests by finish reason", ["finish_reason"],
                                registry=r)
        self.prompt_tokens = Counter("hybrid_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.generated = Counter("hybrid_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("hybrid_time_to_first_token_seconds", "From request to its first token",
                              buckets=LATENCY, registry=r)
        self.itl = Histogram("hybrid_inter_token_latency_seconds", "Between a sequence's consecutive tokens",
                             buckets=LATENCY, registry=r)
        self.running = Gauge("hybrid_running_sequences", "Sequences in the running batch", registry=r)
        self.waiting = Gauge("hybrid_waiting_sequences", "Requests waiting for a row", registry=r)
        self.hits = Counter("hybrid_expert_hits", "Routed-expert uses found in the GPU cache", registry=r)
        self.misses = Counter("hybrid_expert_misses", "Routed-expert uses not in the GPU cache", registry=r)
        self.on_cpu = Counter("hybrid_expert_cpu", "Missed expert uses computed on the CPU", registry=r)
        self.pcie = Counter("hybrid_pcie_bytes", "Expert bytes copied over PCIe", registry=r)
        self.hit_rate = Gauge("hybrid_expert_hit_rate", "Share of expert uses found in the GPU cache", registry=r)
        self.cpu_share = Gauge("hybrid_cpu_share", "Share of missed expert uses computed on the CPU", registry=r)
        self.totals = {"hits": 0, "misses": 0, "cpu": 0, "pcie": 0}

    def iteration(self, stats, running: int, waiting: int) -> None:
        """After each batcher iteration: its expert counters (RunStats) and the batch's size."""
        e = stats.experts
        for counter, key, value in ((self.hits, "hits", e.hits), (self.misses, "misses", e.misses),
                                    (self.on_cpu, "cpu", e.cpu_experts), (self.pcie, "pcie", e.fetched_bytes)):
            counter.inc(value)
            self.totals[key] += value
        t = self.totals
        if t["hits"] + t["misses"]:
            self.hit_rate.set(t["hits"] / (t["hits"] + t["misses"]))
        if t["misses"]:
            self.cpu_share.set(t["cpu"] / t["misses"])
        self.running.set(running)
        self.waiting.set(waiting)

    def token(self, seq, first: bool) -> None:
        t = seq.token_times
        if first:
            self.prompt_tokens.inc(len(seq.prompt))
            self.ttft.observe(t[-1] - seq.submitted)
        elif len(t) > 1:
            self.itl.observe(t[-1] - t[-2])
        self.generated.inc()

    def finished(self, seq) -> None:
        self.requests.labels(seq.finish_reason or "cancelled").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""What an offloaded layer leaves to do once its critical path is queued: policy touches and the next eviction
order, statistics, prefetch scoring and the CPU lane's feedback. Settled when the next layer routes, while the
host would otherwise wait for the GPU."""
from __future__ import annotations

from dataclasses import dataclass

from ..planning.lane_feedback import LaneFeedback
from ..planning.prefetch import Prefetcher
from .expert_cache import ExpertCache
from .stats import RunStats


@dataclass
class LayerOutcome:
    """One layer's result, for the accounting: the experts it needed and how each was served."""
    layer: int
    tokens: dict[int, int]       # expert -> rows routed to it
    hits: int                    # served from the cache (copies made ahead included)
    fetched: int
    cpu: int
    ahead_used: int              # hits that were copies made ahead (counted as misses)
    guessed: bool = False        # the output was the guess made before the routing sync (guesses.py)


class Accounting:
    def __init__(self, first_layer: int, cache: ExpertCache, prefetcher: Prefetcher | None,
                 feedback: LaneFeedback, costs):
        self.first_layer, self.cache, self.prefetcher = first_layer, cache, prefetcher
        self.feedback, self.costs = feedback, costs
        self.stats = RunStats("", 0, 0)
        self.pending: LayerOutcome | None = None
        self.cpu_sample: tuple | None = None        # the last CPU call: (tokens, ms, rows per expert)
        self.predicted: dict[int, set[int]] = {}    # layer -> experts its predecessor guessed for it
        self.prefetched: dict[int, set[int]] = {}   # layer -> experts copied in for it on that guess

    def defer(self, outcome: LayerOutcome) -> None:
        self.pending = outcome

    def settle(self) -> None:
        """The pending layer's bookkeeping. Experts copied ahead count as misses."""
        o, self.pending = self.pending, None
        if o is None:
            return
        if o.layer == self.first_layer:
            self.cache.tick()
        self._score_prefetch(o.layer, set(o.tokens))
        self.cache.touch(o.layer, o.tokens)
        self.cache.prepare(o.layer)
        x = self.stats.experts
        x.count(o.layer, o.hits - o.ahead_used, o.fetched + o.cpu + o.ahead_used)
        x.copied_ahead_used += o.ahead_used
        x.cpu_experts += o.cpu
        x.layers += 1
        x.guessed_layers += o.guessed
        if self.cpu_sample is not None:
            self.feedback.note_cpu(self.costs, *self.cpu_sample)
            self.cpu_sample = None

    def cpu_call(self, tokens: int, ms: float, rows: list[int]) -> None:
        """A layer's CPU experts took `ms` for `tokens` tokens, with `rows` rows per expert."""
        self.stats.experts.cpu_busy_s += ms / 1000
        self.cpu_sample = (tokens, ms, rows)

    def copies(self, n: int, nbytes: int) -> None:
        self.stats.experts.fetched += n
        self.stats.experts.fetched_bytes += n * nbytes

    def prefetch(self, layer: int, predicted: set[int], copied: set[int]) -> None:
        self.predicted[layer], self.prefetched[layer] = predicted, copied
        self.stats.experts.prefetched += len(copied)

    def _score_prefetch(self, layer: int, needed: set[int]) -> None:
        if not self.prefetcher:
            return
        if layer in self.predicted:
            self.prefetcher.score(self.predicted.pop(layer), needed)
        self.stats.experts.prefetch_used += len(self.prefetched.pop(layer, set()) & needed)

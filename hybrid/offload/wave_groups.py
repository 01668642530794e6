"""Prefill's GPU side of an offloaded layer: the hits' grouped FFN, then one per wave of fetched experts as its
copies land, the wave after next issued behind each; quantized slots with many rows go through the bf16 scratch."""
from __future__ import annotations

from ..kernels.quant_scratch import MIN_ROWS as SCRATCH_MIN_ROWS
from .expert_copies import ExpertCopies


class WaveGroups:
    def __init__(self, copies: ExpertCopies, ffn, scratch, layout_of):
        """ffn(layer): the grouped FFN in the layer's layout (LayerFFNs); scratch: prefill's ScratchFFN or None;
        layout_of(layer): the layer's expert layout, which the scratch dequantizes."""
        self.copies, self.ffn, self.scratch, self.layout_of = copies, ffn, scratch, layout_of

    def wave_size(self, staging: int) -> int:
        """Copies per wave with `staging` free staging slots: half of them (one wave lands while the previous one
        computes), a whole number of scratch chunks where there is a scratch: with 18 slots, waves of 9 went
        through the 8-expert scratch as a chunk of 8 and a chunk of 1, and the host's launches per chunk set
        prefill's pace (eval/results/resident_h200: 12 chunks for 52 fetched experts instead of 7)."""
        half = max(1, staging // 2)
        chunk = self.scratch.chunk if self.scratch is not None else 0
        return half - half % chunk if chunk and half > chunk else half

    def run(self, layer: int, hits, waves, lay, offs, xs, ys) -> None:
        """ys rows of every GPU group (lay.rows), each behind its copies; offs [G, S] on the device."""
        self.copies.wait_landed(hits)
        self._group(layer, 0, lay, offs, xs, ys)
        self.copies.read_queued(hits)                # copies made ahead sit in staging slots
        for i, wave in enumerate(waves):
            self.copies.wait_landed(wave)
            self._group(layer, i + 1, lay, offs, xs, ys)
            self.copies.read_queued(wave)
            if i + 2 < len(waves):
                self.copies.issue(layer, waves[i + 2])

    def _group(self, layer: int, g: int, lay, offs, xs, ys) -> None:
        a, b = lay.rows[g]
        if b == a:
            return
        if self.scratch is not None and b - a >= SCRATCH_MIN_ROWS:
            self.scratch(xs[a:b], lay.offs[g], self.layout_of(layer), out=ys[a:b])
        else:
            ys[a:b] = self.ffn(layer)(xs[a:b], offs[g])

"""An offloaded layer's routing sync: what the host reads back before it can plan.

The routing (and the next layer's guessed experts, with prefetch) and the layer's input, for the CPU lane, go to
pinned host buffers in one queued step. The step's graphs queue it before the layer's guess (guesses.py), so the
host's wait does not include the guess, nor the prefetch copies the guess may wait for."""
from __future__ import annotations

import numpy as np
import torch

from .lanes import PinnedBuffer


class RoutingReadback:
    def __init__(self, hidden: int, dtype: torch.dtype, cuda: bool):
        self.cuda = cuda
        self.x = PinnedBuffer(hidden, dtype, cuda)
        self.ids = PinnedBuffer(1, torch.int64, cuda)
        self.pending: tuple | None = None        # (call, ids [T, W], x rows [T, Hd], event)

    def queue(self, call, with_pred: bool) -> None:
        """Copy call.idx (beside call.pred if `with_pred`) and call.x to the host, on the compute stream."""
        idx = torch.cat([call.idx, call.pred], dim=1) if with_pred else call.idx        # [T, W]
        T, W = idx.shape
        ids = self.ids.rows(T * W).view(T, W)
        ids.copy_(idx, non_blocking=True)
        xh = self.x.rows(T)
        xh.copy_(call.x, non_blocking=True)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending = (call, ids, xh, event)

    def take(self, call, with_pred: bool) -> tuple[np.ndarray, torch.Tensor]:
        """Wait for call's readback (queued now if it was not) -> (ids [T, W] as a NumPy copy, x rows (pinned))."""
        if self.pending is None or self.pending[0] is not call:
            self.queue(call, with_pred)
        _, ids, xh, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        return ids.numpy().copy(), xh

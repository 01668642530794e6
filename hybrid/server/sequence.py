"""One request's generation inside the batcher: its prompt, sampling, stop rules, and the events it emits."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..engine.sampling import Sampler, SamplingParams
from .text import TextStream


@dataclass
class Event:
    """What a sequence reports to its client: text (delta), or the end (finish_reason set; error on failure)."""
    delta: str = ""
    finish_reason: str | None = None
    error: str | None = None


@dataclass
class Sequence:
    prompt: list[int]
    params: SamplingParams
    text: TextStream
    emit: Callable[[Event], None]                # called on the batcher's thread
    eos: int | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    token_times: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.params, "cpu")

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled.is_set()

    @property
    def greedy(self) -> bool:
        return self.params.temperature <= 0

    def sample(self, logits: torch.Tensor) -> int:
        """A token drawn from this sequence's logits [V] (float32) with its own temperature, top-p and seed."""
        return int(self.sampler(logits[None].float().cpu())[0])

    def push(self, token: int) -> None:
        """The sequence's next token: emits its text, or the end (nothing once it has ended)."""
        if self.finish_reason is not None:
            return
        self.tokens.append(token)
        self.token_times.append(time.perf_counter())
        if self.params.stop_on_eos and token == self.eos:
            return self.finish("stop")
        delta, stopped = self.text.add(token)
        if stopped:
            return self.finish("stop", delta)
        if len(self.tokens) >= self.params.max_new_tokens:
            return self.finish("length", delta)
        if delta:
            self.emit(Event(delta))

    def finish(self, reason: str, delta: str = "", error: str | None = None) -> None:
        if self.finish_reason is not None:
            return
        self.finish_reason = reason
        self.emit(Event(delta + self.text.flush(), reason, error))

"""Host-side layout of one MoE layer's work: token rows sorted into groups (hits, fetch waves, CPU experts),
with per-slot offsets for grouped GEMMs over the cache slots. NumPy only."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LayerLayout:
    perm: np.ndarray                     # [T*K] int32: flat (token, k) assignment index of each sorted row
    offs: np.ndarray                     # [G, S] int32: cumulative rows per slot, one row per GPU group
    rows: list[tuple[int, int]]          # [G] sorted-row range of each GPU group (hits, then fetch waves)
    cpu_start: int                       # first sorted row of the CPU experts
    cpu_segments: list[tuple[int, int, int]]   # (expert, first row from cpu_start, rows)


def layer_layout(flat: np.ndarray, counts: np.ndarray, groups: list[list[tuple[int, int]]], cpu: list[int],
                 n_slots: int) -> LayerLayout:
    """flat [T*K] expert ids; counts [E]; groups: per GPU group a list of (expert, slot); cpu: experts in order."""
    G = len(groups)
    key = np.zeros(counts.shape[0], dtype=np.int64)
    per_slot = np.zeros((G, n_slots), dtype=np.int32)
    rows, end = [], 0
    for g, members in enumerate(groups):
        size = 0
        for e, s in members:
            c = int(counts[e])
            key[e] = g * n_slots + s
            per_slot[g, s] = c
            size += c
        rows.append((end, end + size))
        end += size
    segs, a = [], 0
    for r, e in enumerate(cpu):
        key[e] = G * n_slots + r
        c = int(counts[e])
        segs.append((e, a, c))
        a += c
    perm = np.argsort(key[flat], kind="stable").astype(np.int32)
    return LayerLayout(perm, np.cumsum(per_slot, axis=1, dtype=np.int32), rows, end, segs)


PYTHON_PICKS = 256     # cpu_rows in plain Python up to this many picks (batch-16 decode: 96): its NumPy version took
                       # ~74 us inside the engine there (cold caches after the CPU lane), on the critical path


def _cpu_rows_small(flat: np.ndarray, K: int, cpu: list[int]) -> tuple[np.ndarray, list]:
    """cpu_rows for a few picks: each CPU expert's tokens in pick order, as the stable sort orders them."""
    where = {e: i for i, e in enumerate(cpu)}
    tokens: list[list[int]] = [[] for _ in cpu]
    for i, e in enumerate(flat.tolist()):
        j = where.get(e)
        if j is not None:
            tokens[j].append(i // K)
    segs, a = [], 0
    for e, t in zip(cpu, tokens):
        segs.append((e, a, len(t)))
        a += len(t)
    return np.array([r for t in tokens for r in t], dtype=np.int32), segs


def cpu_rows(flat: np.ndarray, K: int, counts: np.ndarray, cpu: list[int]) -> tuple[np.ndarray, list]:
    """The CPU experts' rows in the order `layer_layout` sorts them, before the GPU groups are known: the token
    of each row [n] int32, and the segments (expert, first row, rows)."""
    if flat.shape[0] == K:                       # one token: a row per expert, each of token 0
        return np.zeros(len(cpu), dtype=np.int32), [(e, i, 1) for i, e in enumerate(cpu)]
    if flat.shape[0] <= PYTHON_PICKS:
        return _cpu_rows_small(flat, K, cpu)
    rank = np.full(counts.shape[0], len(cpu), dtype=np.int64)
    rank[cpu] = np.arange(len(cpu))
    c = counts[cpu]
    ends = np.cumsum(c)
    rows = (np.argsort(rank[flat], kind="stable")[:int(ends[-1])] // K).astype(np.int32)
    return rows, list(zip(cpu, (ends - c).tolist(), c.tolist()))

"""What the chain solver exchanges between the blocks of rows, and what it costs.

A ``Comm`` owns one contiguous block of rows. The solver calls exactly these collectives per
iteration (DESIGN section 4): ``halo`` (the last row of the previous block), ``carry`` (the
exclusive scan of block summaries), ``all_sum`` (stopping statistics and the Anderson Gram row,
one small tensor), and once at the end ``from_last`` (the final row lives on the last block).
``LocalComm`` is the single-process case: one block, no collectives.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .chain import Carry, Summary


@dataclass
class CommStats:
    seconds: float = 0.0
    bytes_sent: int = 0
    calls: int = 0


def split_rows(n: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous blocks [lo, hi) of n rows over ``parts`` owners; the first n % parts get one more."""
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for r in range(parts):
        hi = lo + base + (1 if r < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


@dataclass
class LocalComm:
    """All rows in one process: every collective is the identity."""

    stats: CommStats = field(default_factory=CommStats)
    rank: int = 0
    size: int = 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def halo(self, last_row: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        return first

    def carry(self, initial: Carry, summary: Summary, with_q: bool) -> Carry:
        return initial

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def from_last(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def agree(self, payload: bytes) -> list[bytes]:
        return [payload]

    def timed(self):
        return _Timer(self.stats)


class _Timer:
    def __init__(self, stats: CommStats):
        self.stats = stats

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.stats.seconds += time.perf_counter() - self.t0
        self.stats.calls += 1
        return False

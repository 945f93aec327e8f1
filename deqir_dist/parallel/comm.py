"""What the chain solver exchanges between the blocks of rows, and what it costs.

A ``Comm`` owns one contiguous block of rows. The solver calls exactly these collectives per
iteration (DESIGN section 4): ``halo`` (the last row of the previous block), ``carry`` (the
exclusive scan of block summaries), ``all_sum`` (stopping statistics and the Anderson Gram row,
one small tensor), and once at the end ``from_last`` (the final row lives on the last block).
``LocalComm`` is the single-process case: one block, no collectives.

The sliding window (``window.solve_window``) re-splits its active rows over the ranks as it
moves: ``reshard`` sends each rank the rows of its new block (``reshard_plan``), ``halo`` skips
ranks left without rows (they add a zero summary to the carry), and ``from_rank`` broadcasts the
frozen boundary row and the final rows of images that finish.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from deqir_dist.sampling.chain import Carry, Summary


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


def offset_split(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """``split_rows`` of the global rows [lo, hi): empty blocks, if any, are the last ones."""
    return [(lo + a, lo + b) for a, b in split_rows(hi - lo, parts)]


def reshard_plan(old: list[tuple[int, int]], new: list[tuple[int, int]], end: int):
    """Row moves when a window's blocks change from ``old`` to ``new``.

    New global row j takes old row min(j, end - 1): rows past the old window's end ``end`` are
    initialised by copying its last row forward. Returns (src, dst, rows), one per pair of
    ranks that exchange anything, ``rows`` the source rows (local to src's old block) in the
    order of dst's new rows.
    """
    moves = []
    for dst, (a, b) in enumerate(new):
        for src, (c, e) in enumerate(old):
            if c == e:
                continue
            rows = [min(j, end - 1) - c for j in range(a, b) if c <= min(j, end - 1) < e]
            if rows:
                moves.append((src, dst, rows))
    return moves


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

    def halo(self, last_row: torch.Tensor, first: torch.Tensor, active: int | None = None) -> torch.Tensor:
        return first

    def carry(self, initial: Carry, summary: Summary, with_q: bool) -> Carry:
        return initial

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def from_last(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def from_rank(self, t: torch.Tensor, src: int) -> torch.Tensor:
        return t

    def reshard(self, rows: torch.Tensor, old, new, end: int) -> torch.Tensor:
        """This rank's rows of the ``new`` blocks, from its rows (b, n, ...) of the ``old`` ones."""
        (_, _, idx), = reshard_plan(old, new, end)
        return rows[:, idx]

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

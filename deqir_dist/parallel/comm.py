"""What the chain solver exchanges between the blocks of rows, and what it costs.

A ``Comm`` (the protocol below) owns one contiguous block of rows. The solver calls exactly
these collectives per iteration (docs/design.md section 4): ``halo`` (the last row of the
previous block), ``carry`` (the exclusive scan of block summaries), ``all_sum`` (stopping
statistics and the Anderson Gram row, one small tensor), and once at the end ``from_last``
(the final row lives on the last block). The adjoint (``solvers.adjoint``) runs the mirror
image: ``halo_back`` (the first row of the next block), ``reverse_carry`` (the exclusive
reverse scan of adjoint block summaries) and ``from_first`` (dL/dxi lives on the first block).
``LocalComm`` is the single-process case: one block, every collective the identity;
``parallel.dist.DistComm`` implements them over torch.distributed.

The sliding window (``window.solve_window``) re-splits its active rows over the ranks as it
moves: ``reshard`` sends each rank the rows of its new block (``reshard_plan``), ``halo`` skips
ranks left without rows (they add a zero summary to the carry), and ``from_rank`` broadcasts the
frozen boundary row and the final rows of images that finish.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from deqir_dist.sampling.adjoint import ReverseCarry, ReverseSummary
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


class Comm(Protocol):
    """What a block of rows exchanges with the others: the forward and the reverse collectives.

    Every rank calls every collective in the same order (they are collective even where a
    rank's part is empty). ``LocalComm``: one block, identities; ``DistComm``: torch.distributed."""

    stats: CommStats
    rank: int
    size: int
    block_decays: list[tuple[float, float]]     # (null, range) decay products of each rank's rows

    @property
    def is_first(self) -> bool: ...

    @property
    def is_last(self) -> bool: ...

    # forward
    def halo(self, last_row: torch.Tensor, first: torch.Tensor, active: int | None = None) -> torch.Tensor:
        """The previous block's last row (the first block: ``first``); ranks >= ``active`` hold no rows."""

    def carry(self, initial: Carry, summary: Summary, with_q: bool) -> Carry:
        """Exclusive scan of the block summaries: the chain state entering this block."""

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the ranks (every rank gets the sum)."""

    def from_last(self, t: torch.Tensor) -> torch.Tensor:
        """The last rank's ``t`` on every rank."""

    def from_rank(self, t: torch.Tensor, src: int) -> torch.Tensor:
        """Rank ``src``'s ``t`` on every rank."""

    def reshard(self, rows: torch.Tensor, old, new, end: int) -> torch.Tensor:
        """This rank's rows of the ``new`` blocks from its rows of the ``old`` ones (``reshard_plan``)."""

    # reverse (the adjoint)
    def halo_back(self, first_row: torch.Tensor, last_default: torch.Tensor) -> torch.Tensor:
        """The next block's first row (the last block: ``last_default``)."""

    def reverse_carry(self, summary: ReverseSummary, decays: list[float], with_q: bool) -> ReverseCarry | None:
        """Exclusive reverse scan of adjoint block summaries: the adjoint entering from the rows
        after this block (None on the last block: nothing comes after it)."""

    def from_first(self, t: torch.Tensor) -> torch.Tensor:
        """The first rank's ``t`` on every rank."""

    def agree(self, payload: bytes) -> list[bytes]:
        """Every rank's ``payload`` (input digests)."""

    def share(self, payload: bytes) -> bytes:
        """Rank 0's ``payload`` on every rank (any length; the others' payloads are ignored):
        one decision, made once, that every rank follows (solver="auto"'s plan)."""


@dataclass
class LocalComm:
    """All rows in one process: every collective is the identity (a ``Comm``)."""

    stats: CommStats = field(default_factory=CommStats)
    rank: int = 0
    size: int = 1
    block_decays: list[tuple[float, float]] = field(default_factory=lambda: [(1.0, 1.0)])

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

    def halo_back(self, first_row: torch.Tensor, last_default: torch.Tensor) -> torch.Tensor:
        return last_default

    def reverse_carry(self, summary: ReverseSummary, decays: list[float], with_q: bool) -> ReverseCarry | None:
        return None

    def from_first(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def agree(self, payload: bytes) -> list[bytes]:
        return [payload]

    def share(self, payload: bytes) -> bytes:
        return payload

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

"""The chain sharded over processes with torch.distributed (docs/design.md section 4).

Rank r of a group of P owns rows [lo_r, hi_r) of the chain (``split_rows``). Per iteration it
exchanges exactly: the halo row (its last row to rank r+1, point-to-point), the block summaries
(an all_gather of one image per rank, from which every rank folds its exclusive prefix), and one
small all_reduce (stopping statistics and the Anderson Gram row). At the end the final row is
broadcast from the last rank. Before solving, an all_gather of input digests makes sure every
rank restores the same problem.

Failures never hang: every collective is bounded by the process group's timeout (pass
``timeout`` to ``init_distributed``). When one fails, each surviving rank records the failure
in the group's store, waits a short grace period, and raises a ``DeqirError`` naming the ranks
that did not record it (dead or hung).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from deqir_dist.errors import DeqirError
from deqir_dist.parallel.comm import CommStats, LocalComm, reshard_plan
from deqir_dist.sampling.adjoint import ReverseCarry, ReverseSummary
from deqir_dist.sampling.chain import Carry, Summary

DEFAULT_TIMEOUT_S = 300.0
_GRACE_S = 3.0


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     device: str | None = None) -> torch.device:
    """Join the env:// process group (torchrun) and pick this rank's device.

    Device: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU (or ``device``). Backend: NCCL
    on CUDA, gloo on CPU (or ``backend``).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        except ValueError as e:
            raise DeqirError(f"cannot join the process group (run under torchrun?): {e}") from e
    return dev


class DistComm(LocalComm):
    """Collectives for one rank of a sharded chain (``group`` None: the default group)."""

    _calls = 0   # restores started in this process: a key prefix every rank agrees on

    def __init__(self, group=None, device: torch.device | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise DeqirError("distributed=True needs an initialised torch.distributed process group")
        super().__init__(CommStats(), dist.get_rank(group), dist.get_world_size(group))
        self.group = group
        self.backend = dist.get_backend(group)
        self.device = torch.device("cpu") if self.backend == "gloo" else (device or torch.device("cpu"))
        self.global_ranks = [dist.get_global_rank(group, r) if group is not None else r for r in range(self.size)]
        DistComm._calls += 1
        self._prefix = f"deqir/{DistComm._calls}/"
        self._store = None
        try:
            from torch.distributed.distributed_c10d import _get_default_store
            self._store = _get_default_store()
        except Exception:   # no store: failures are still reported, without naming the rank
            self._store = None
        # (null-space, range-space) decay products of each rank's rows: Summary.p_decay, q_decay
        self.block_decays: list[tuple[float, float]] = [(1.0, 1.0)] * self.size

    # ------------------------------------------------------------------ failure handling
    def _fail(self, what: str, err: Exception):
        culprits, store_lost = self._missing_ranks(what)
        if store_lost:      # the store died with its host: who else failed cannot be learnt
            who = "rank 0 died or hung (it holds the group's store; the other ranks' state is unknown)"
        else:
            who = (f"rank {', '.join(map(str, culprits))} died or hung" if culprits
                   else "a peer rank failed")
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DeqirError(f"rank {self.rank}: collective '{what}' failed: {who} ({first[:160]})") from err

    def _missing_ranks(self, what: str) -> tuple[list[int], bool]:
        """(ranks that did not report this failure within the grace period, whether the store
        itself became unreachable). Every rank that did report is alive, so with the store up the
        list holds exactly the dead or hung ones, however many there are."""
        if self._store is None:
            return [], False
        try:
            self._store.set(f"{self._prefix}failed/{self.rank}", what)
            deadline = time.monotonic() + _GRACE_S
            while True:
                missing = [r for r in range(self.size)
                           if not self._store.check([f"{self._prefix}failed/{r}"])]
                if not missing or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            self._store.set(f"{self._prefix}read/{self.rank}", "1")
            if self.rank == 0:      # the store's host stays until the live ranks have read it: leaving
                deadline = time.monotonic() + _GRACE_S      # first, it would be the rank they name
                while time.monotonic() < deadline and not self._store.check(
                        [f"{self._prefix}read/{r}" for r in range(self.size) if r not in missing]):
                    time.sleep(0.05)
            return missing, False
        except Exception:
            return ([0] if self.rank != 0 else []), self.rank != 0   # the store lives with rank 0 (or the agent)

    def _run(self, what: str, fn):
        with self.timed():
            try:
                return fn()
            except DeqirError:
                raise
            except Exception as e:   # RuntimeError / DistBackendError / DistNetworkError
                self._fail(what, e)

    def _dev(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device).contiguous()

    # ------------------------------------------------------------------ collectives
    def halo(self, last_row: torch.Tensor, first: torch.Tensor, active: int | None = None) -> torch.Tensor:
        """Send my last row to rank r+1; receive rank r-1's last row (rank 0 uses ``first``).

        ``active``: only ranks 0..active-1 hold rows (a window shorter than the group); the others
        neither send nor receive and get ``first`` back."""
        active = self.size if active is None else active

        def go():
            ops = []
            recv = None
            if self.rank >= active:
                return first
            if self.rank + 1 < active:
                ops.append(dist.P2POp(dist.isend, self._dev(last_row), self.global_ranks[self.rank + 1], self.group))
                self.stats.bytes_sent += last_row.numel() * last_row.element_size()
            if self.rank > 0:
                recv = torch.empty(first.shape, dtype=first.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, recv, self.global_ranks[self.rank - 1], self.group))
            if ops:
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            return first if recv is None else recv.to(first.device)
        return self._run("halo", go)

    def _gather_summaries(self, what: str, p: torch.Tensor, q: torch.Tensor, with_q: bool) -> list[torch.Tensor]:
        """all_gather of every rank's block summary: (p, q) stacked, or p alone without range memory."""
        def go():
            mine = self._dev(torch.stack([p, q]) if with_q else p[None])
            parts = [torch.empty_like(mine) for _ in range(self.size)]
            dist.all_gather(parts, mine, group=self.group)
            self.stats.bytes_sent += mine.numel() * mine.element_size() * (self.size - 1)
            return parts
        return self._run(what, go)

    def carry(self, initial: Carry, summary: Summary, with_q: bool) -> Carry:
        """Exclusive scan of the block summaries: fold ranks 0..r-1 into the initial carry."""
        parts = self._gather_summaries("carry", summary.p_tail, summary.q_tail, with_q)
        carry = initial
        for r in range(self.rank):
            p = parts[r][0].to(initial.p.device)
            q = parts[r][1].to(initial.q.device) if with_q else torch.zeros_like(initial.q)
            carry = Summary(p, q, *self.block_decays[r]).apply(carry)
        return carry

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        def go():
            buf = self._dev(t)
            dist.all_reduce(buf, group=self.group)
            self.stats.bytes_sent += buf.numel() * buf.element_size()
            return buf.to(t.device)
        return self._run("all_sum", go)

    def from_last(self, t: torch.Tensor) -> torch.Tensor:
        return self.from_rank(t, self.size - 1, "final broadcast")

    def from_rank(self, t: torch.Tensor, src: int, what: str = "broadcast") -> torch.Tensor:
        """Broadcast ``t`` from rank ``src`` (every rank passes a tensor of the same shape and dtype)."""
        def go():
            buf = self._dev(t)
            dist.broadcast(buf, src=self.global_ranks[src], group=self.group)
            if self.rank == src:
                self.stats.bytes_sent += buf.numel() * buf.element_size() * (self.size - 1)
            return buf.to(t.device)
        return self._run(what, go)

    def reshard(self, rows: torch.Tensor, old, new, end: int) -> torch.Tensor:
        """Point-to-point row moves of ``comm.reshard_plan``; returns this rank's new rows."""

        plan = reshard_plan(old, new, end)

        def go():
            a, b = new[self.rank]
            out = torch.empty((rows.shape[0], b - a, *rows.shape[2:]), dtype=rows.dtype, device=rows.device)
            ops, recvs = [], []
            for src, dst, idx in plan:
                if src == self.rank and dst == self.rank:
                    continue
                if src == self.rank:
                    buf = self._dev(rows[:, idx])
                    ops.append(dist.P2POp(dist.isend, buf, self.global_ranks[dst], self.group))
                    self.stats.bytes_sent += buf.numel() * buf.element_size()
                elif dst == self.rank:
                    buf = torch.empty((rows.shape[0], len(idx), *rows.shape[2:]), dtype=rows.dtype, device=self.device)
                    ops.append(dist.P2POp(dist.irecv, buf, self.global_ranks[src], self.group))
                    recvs.append((src, buf))
            if ops:
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            # place received and kept rows in new-row order: sources own increasing row ranges
            pos = 0
            parts = {src: buf for src, buf in recvs}
            for src, dst, idx in plan:
                if dst != self.rank:
                    continue
                piece = rows[:, idx] if src == self.rank else parts[src].to(rows.device)
                out[:, pos:pos + len(idx)] = piece
                pos += len(idx)
            return out
        return self._run("reshard", go)

    # ------------------------------------------------------------------ adjoint (reverse) collectives
    def halo_back(self, first_row: torch.Tensor, last_default: torch.Tensor) -> torch.Tensor:
        """Reverse halo: send my first row to rank r-1; receive rank r+1's (the last rank uses ``last_default``)."""
        def go():
            ops = []
            recv = None
            if self.rank > 0:
                ops.append(dist.P2POp(dist.isend, self._dev(first_row), self.global_ranks[self.rank - 1], self.group))
                self.stats.bytes_sent += first_row.numel() * first_row.element_size()
            if self.rank + 1 < self.size:
                recv = torch.empty(last_default.shape, dtype=last_default.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, recv, self.global_ranks[self.rank + 1], self.group))
            if ops:
                for w in dist.batch_isend_irecv(ops):
                    w.wait()
            return last_default if recv is None else recv.to(last_default.device)
        return self._run("reverse halo", go)

    def reverse_carry(self, summary, decays: list[float], with_q: bool):
        """Exclusive REVERSE scan of adjoint block summaries (``sampling.adjoint.ReverseSummary``).

        all_gather of every rank's (p_total, q_head), then fold ranks P-1 down to r+1 starting from
        a zero carry (nothing comes after the last row). ``decays[r]`` is rank r's q_decay. Returns
        a ``sampling.adjoint.ReverseCarry``, or None on the last rank (no rows after it).
        """

        parts = self._gather_summaries("reverse carry", summary.p_total, summary.q_head, with_q)
        if self.is_last:
            return None
        dev = summary.p_total.device
        zero = torch.zeros_like(summary.p_total)
        carry = ReverseCarry(zero, zero)
        for r in range(self.size - 1, self.rank, -1):
            p = parts[r][0].to(dev)
            q = parts[r][1].to(dev) if with_q else zero
            carry = ReverseSummary(p, q, decays[r]).apply(carry)
        return carry

    def from_first(self, t: torch.Tensor) -> torch.Tensor:
        return self.from_rank(t, 0, "first broadcast")

    def agree(self, payload: bytes) -> list[bytes]:
        """All ranks' 32-byte digests (all_gather)."""
        def go():
            mine = torch.tensor(list(payload), dtype=torch.int64, device=self.device)
            parts = [torch.empty_like(mine) for _ in range(self.size)]
            dist.all_gather(parts, mine, group=self.group)
            return [bytes(p.tolist()) for p in parts]
        return self._run("input check", go)

    def share(self, payload: bytes) -> bytes:
        """Rank 0's bytes on every rank: its length, then its bytes (two broadcasts)."""
        def go():
            n = torch.tensor([len(payload) if self.rank == 0 else 0], dtype=torch.int64, device=self.device)
            dist.broadcast(n, src=self.global_ranks[0], group=self.group)
            buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=self.device)
            if self.rank == 0:
                buf.copy_(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
            dist.broadcast(buf, src=self.global_ranks[0], group=self.group)
            if self.rank == 0:
                self.stats.bytes_sent += (8 + buf.numel()) * (self.size - 1)
            return buf.cpu().numpy().tobytes()
        return self._run("plan broadcast", go)


def problem_digest(y: torch.Tensor, xi: torch.Tensor, op, config: dict) -> bytes:
    """A digest of everything that must be equal on all ranks (inputs, operator, settings)."""
    h = hashlib.sha256()
    for t in (y, xi):
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    h.update(json.dumps(op.describe(), sort_keys=True, default=str).encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.digest()


def check_same_inputs(comm: DistComm, digest: bytes) -> None:
    """Fail on every rank, clearly, when any rank was given a different problem."""
    digests = comm.agree(digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise DeqirError(f"ranks {', '.join(map(str, differ))} were given different inputs than rank 0 "
                         "(y, noise, operator or settings); every rank must restore the same problem")


def all_ranks_ok(fn, device=None):
    """Run ``fn`` on every rank of the default group and agree, in one all_reduce, on whether every
    rank succeeded: a rank whose ``fn`` raised DeqirError re-raises it, the others raise one naming
    it, so no rank waits in a later collective for one that stopped. ``device``: where the flags
    live (the rank's GPU under NCCL). Returns ``fn()``'s result."""
    rank, world = dist.get_rank(), dist.get_world_size()
    err, out = None, None
    try:
        out = fn()
    except DeqirError as e:
        err = e
    flags = torch.zeros(world, device=device if dist.get_backend() == "nccl" else "cpu")
    flags[rank] = 0.0 if err is None else 1.0
    dist.all_reduce(flags)
    if err is not None:
        raise err
    bad = [r for r, v in enumerate(flags.tolist()) if v > 0]
    if bad:
        raise DeqirError(f"rank {', '.join(map(str, bad))} failed to prepare (see its error); stopping")
    return out

"""A cost-emulating denoiser: a cheap real model held to a measured c(b) table.

``CostEmulatingDenoiser(model, c_ms)`` runs ``model`` (normally the analytic oracle, whose
E[eps | x_t] is exact and cheap) and then sleeps until the call has lasted c(b) milliseconds,
b = the call's batch (rows x images), with c interpolated linearly between the table's batches
and extrapolated linearly above the largest (``api.planner.cost_at``'s rule, on the raw table:
the planner also lifts a dip to its non-decreasing envelope, the emulator sleeps as told). Each rank of
a real multi-process run then spends as long in its denoiser calls as one GPU running the
table's model would, while the chain, the solver and the collectives are the real ones: the
end-to-end latency of serial, picard and parareal at P ranks can be measured without P GPUs.

A call whose real compute alone exceeds c(b) cannot be held to it: it is counted in
``overruns`` (with the excess in ``overrun_s``) and never hidden, so a benchmark can say when
its machine was too slow or too busy to emulate the table. ``stats()`` reports the calls, rows,
real compute, sleep and held seconds; ``reset()`` clears them.

The table is what ``deqir bench --profile`` writes and ``bench/results/adm256-h200-design-cb.json``
holds: a JSON object whose ``c_ms`` maps batch sizes to milliseconds.
"""
from __future__ import annotations

import itertools
import json
import math
import time

import torch

from deqir_dist.errors import DeqirError
from deqir_dist.io.limits import read_file_bytes


def read_cost_table(c_ms, source="cost table") -> dict[int, float]:
    """{b: ms} from a mapping with integer-like keys b >= 1 and finite times > 0 (DeqirError otherwise)."""
    try:
        table = {int(k): float(v) for k, v in dict(c_ms).items()}
    except (ValueError, TypeError) as e:
        raise DeqirError(f"{source}: expected {{rows: milliseconds}}, got {c_ms!r:.80}") from e
    if not table or any(b < 1 or not 0 < ms < math.inf for b, ms in table.items()):
        raise DeqirError(f"{source}: needs rows >= 1 and finite milliseconds > 0, got {table!r:.80}")
    return table


def load_cost_file(path) -> dict[int, float]:
    """The ``c_ms`` table of a cost-profile JSON file (DeqirError with one line otherwise)."""
    try:
        data = json.loads(read_file_bytes(path, "cost table", cap=1 << 20))["c_ms"]
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())
        raise DeqirError(f"cannot read cost table {path}: {why}") from None
    return read_cost_table(data, f"cost table {path}")


def interpolate_cost(table: dict[int, float], b: int) -> float:
    """c(b) in ms: linear between the table's batches, c(min) below, linear extrapolation above."""
    pts = sorted(table.items())
    if b <= pts[0][0]:
        return pts[0][1]
    for (b0, c0), (b1, c1) in itertools.pairwise(pts):
        if b <= b1:
            return c0 + (c1 - c0) * (b - b0) / (b1 - b0)
    if len(pts) == 1:
        return pts[0][1] * b / pts[0][0]
    (b0, c0), (b1, c1) = pts[-2:]
    return c1 + (c1 - c0) / (b1 - b0) * (b - b1)


def _sync(x: torch.Tensor) -> None:
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)


class CostEmulatingDenoiser(torch.nn.Module):
    """``model`` whose every call of batch b lasts at least c(b) of ``c_ms`` (see the module doc)."""

    def __init__(self, model: torch.nn.Module, c_ms, source: str = "cost table"):
        super().__init__()
        if not callable(model):
            raise DeqirError("the emulated denoiser needs a callable model(x, t)")
        self.model = model
        self.c_ms = read_cost_table(c_ms, source)
        self.source = str(source)
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.rows = 0
        self.compute_s = 0.0         # real compute of the wrapped model
        self.sleep_s = 0.0           # time slept to reach c(b)
        self.held_s = 0.0            # wall-clock of the calls, compute + sleep
        self.target_s = 0.0          # sum of c(b) over the calls
        self.overruns = 0            # calls whose compute alone exceeded c(b)
        self.overrun_s = 0.0         # by how much, summed
        self.batches: dict[int, int] = {}

    def cost_ms(self, b: int) -> float:
        return interpolate_cost(self.c_ms, b)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.model(x, t)
        _sync(out)
        b = int(x.shape[0])
        target = self.cost_ms(b) / 1e3
        compute = time.perf_counter() - t0
        if compute > target:
            self.overruns += 1
            self.overrun_s += compute - target
        else:
            end = t0 + target
            left = end - time.perf_counter()
            if left > 0:
                time.sleep(left)        # no spinning: on a shared CPU the other ranks need the cores
        held = time.perf_counter() - t0
        self.calls += 1
        self.rows += b
        self.compute_s += compute
        self.sleep_s += held - compute
        self.held_s += held
        self.target_s += target
        self.batches[b] = self.batches.get(b, 0) + 1
        return out

    def stats(self) -> dict:
        return {"calls": self.calls, "rows": self.rows, "compute_s": self.compute_s, "sleep_s": self.sleep_s,
                "held_s": self.held_s, "target_s": self.target_s, "overruns": self.overruns,
                "overrun_s": self.overrun_s, "batches": {str(k): v for k, v in sorted(self.batches.items())}}

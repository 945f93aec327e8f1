"""Executors: where a batch's restore() runs, behind one interface the engine calls.

* :class:`InProcessExecutor`: the model in this process (P = 1).
* ``serve.gang.LocalGangExecutor``: rank 0 here, ranks 1..P-1 spawned locally; every batch is
  handed to all of them and its chain sharded over the gang.

The interface: ``warmup()`` (one small restore through the batch path, before readiness),
``run(batch, abort)`` -> RestoreResult (``abort``, restore's callback, raises to drop a batch
whose images are all gone; raises ``GangFailed`` when the gang broke), ``plan_name``,
``health()`` (None, or why the executor cannot serve), ``close()``.
"""
from __future__ import annotations

import torch

from deqir_dist.physics.registry import make_operator
from deqir_dist.serve.batch import Batch, run_batch


def warmup_batch(model, images: int = 1) -> Batch:
    """A small problem on the model's canvas (2 steps), to run the whole path once."""
    mult = int(getattr(model, "size_multiple", 1) or 1)
    side = max(mult, 8 if mult < 8 else mult)
    channels = int(getattr(model, "in_channels", 3) or 3)
    op = make_operator("denoise", image_shape=(channels, side, side))
    g = torch.Generator().manual_seed(0)
    y = torch.rand((images, channels, side, side), generator=g) * 2 - 1
    return Batch([f"warmup{i}" for i in range(images)], [0] * images, y, op,
                 {"steps": 2, "solver": "serial", "sigma_y": 0.0})


class InProcessExecutor:
    procs = 1
    plan_name = "one process"

    def __init__(self, model):
        self.model = model

    def warmup(self) -> None:
        run_batch(self.model, warmup_batch(self.model, 1))
        run_batch(self.model, warmup_batch(self.model, 2))

    def run(self, batch: Batch, abort=None):
        return run_batch(self.model, batch, callback=abort)

    def health(self) -> str | None:
        return None

    def close(self) -> None:
        pass

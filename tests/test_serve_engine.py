"""The serving engine in one process: exact batches (each image as alone), the keyed batcher, the
bounded queue, deadlines and cancellation (a fake executor where timing matters)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from deqir_dist.dataset.items import Item
from deqir_dist.models import load_denoiser
from deqir_dist.physics.registry import make_operator
from deqir_dist.serve.batch import Batch, period, run_batch
from deqir_dist.serve.engine import Cancelled, DeadlineExceeded, Engine, QueueFull
from deqir_dist.serve.inputs import Prepared


@pytest.fixture(scope="module")
def builtin():
    torch.set_num_threads(1)
    return load_denoiser("builtin")


@pytest.mark.parametrize("solver,extra", [("serial", {}), ("picard", {}), ("anderson", {}),
                                          ("picard", {"nw": 0.5, "etw": 0.5}), ("auto", {})])
def test_a_batch_gives_each_image_its_alone_result(builtin, solver, extra):
    op = make_operator("sr_bicubic", image_shape=(3, 22, 22), scale=2)      # 22: padded to the model's 24
    g = torch.Generator().manual_seed(0)
    y = op.A(torch.rand((3, 3, 22, 22), generator=g) * 2 - 1)
    kw = {"steps": 6, "solver": solver, "sigma_y": 0.01, **extra}
    names, seeds = ["a", "b", "c"], [0, 5, 0]
    together = run_batch(builtin, Batch(names, seeds, y, op, kw))
    for i in range(3):
        alone = run_batch(builtin, Batch([names[i]], [seeds[i]], y[i:i + 1], op, kw))
        assert torch.equal(alone.image[0], together.image[i]), (solver, i)
        assert alone.iterations_per_image[0] == together.iterations_per_image[i]


def test_period_finds_the_rows_of_one_image():
    assert period(torch.full((5,), 7)) == 1
    assert period(torch.tensor([9, 8, 7, 9, 8, 7])) == 3
    assert period(torch.tensor([9, 8, 7])) == 3


class FakeExecutor:
    """Records the batches; each takes ``seconds``; ``gate`` holds it until set."""
    procs, plan_name = 1, "one process"

    def __init__(self, seconds=0.0):
        self.batches, self.seconds, self.gate = [], seconds, threading.Event()
        self.gate.set()

    def warmup(self):
        pass

    def health(self):
        return None

    def run(self, batch, abort=None):
        self.batches.append(list(batch.names))
        t_end = time.monotonic() + self.seconds
        while time.monotonic() < t_end or not self.gate.is_set():
            if abort is not None:
                abort()                    # a stopping decision
            time.sleep(0.005)

        class R:
            image = torch.zeros((len(batch.names), 3, 4, 4))
            iterations_per_image = [1] * len(batch.names)
            solver, plan, settings, settings_source = "serial", None, {}, {}
        return R()


def _prepared(name: str, key: str) -> Prepared:
    op = make_operator("denoise", image_shape=(3, 4, 4))
    return Prepared(Item(name, None, torch.zeros((1, 3, 4, 4)), op), {}, 0, 8, "denoise", key)


def test_batches_by_key_up_to_max_batch():
    ex = FakeExecutor()
    ex.gate.clear()                              # the first batch holds the gang busy
    eng = Engine(ex, max_queue=16, max_batch=2, batch_wait_s=0.0)
    eng.start()
    first = eng.submit(_prepared("first", "k0"), 30)
    time.sleep(0.1)
    jobs = [eng.submit(_prepared(f"{k}{i}", k), 30) for i in range(3) for k in ("a", "b")]
    ex.gate.set()
    for j in [first, *jobs]:
        j.future.result(10)
    eng.close()
    assert ex.batches[0] == ["first"]
    assert ex.batches[1:] == [["a0", "a1"], ["b0", "b1"], ["a2"], ["b2"]]     # oldest head first, per key


def test_full_queue_deadline_and_cancel():
    ex = FakeExecutor()
    ex.gate.clear()
    eng = Engine(ex, max_queue=2, max_batch=1, batch_wait_s=0.0)
    eng.start()
    running = eng.submit(_prepared("run", "k"), 30)
    time.sleep(0.1)
    late = eng.submit(_prepared("late", "k"), 0.05)
    left = eng.submit(_prepared("left", "k"), 30)
    with pytest.raises(QueueFull):
        eng.submit(_prepared("over", "k"), 30)
    eng.cancel(left)
    with pytest.raises(Cancelled):
        left.future.result(1)
    time.sleep(0.1)
    ex.gate.set()
    running.future.result(10)
    with pytest.raises(DeadlineExceeded):
        late.future.result(10)
    assert ex.batches == [["run"]]            # neither the late nor the cancelled one ran
    eng.close()


def test_cancelling_every_image_of_a_running_batch_stops_it():
    ex = FakeExecutor(seconds=30)
    eng = Engine(ex, max_queue=4, max_batch=1, batch_wait_s=0.0)
    eng.start()
    job = eng.submit(_prepared("x", "k"), 60)
    time.sleep(0.2)
    t0 = time.monotonic()
    eng.cancel(job)
    nxt = eng.submit(_prepared("y", "k"), 60)
    ex.seconds = 0
    nxt.future.result(5)                         # the gang was freed at the next stopping decision
    assert time.monotonic() - t0 < 5
    eng.close()


def test_the_layout_follows_the_load(builtin):
    """Sharded for one image, data-parallel once a batch fills the ranks (where the model says so)."""
    from deqir_dist.serve.plan import choose_layout, deal
    op = make_operator("sr_bicubic", image_shape=(3, 24, 24), scale=2)

    def batch(n, **kw):
        return Batch([f"i{k}" for k in range(n)], [0] * n, torch.zeros((n, 3, 12, 12)), op,
                     {"steps": 100, "etw": 0.0, "solver": "picard", **kw})
    gpu_like = {1: 10.0, 2: 10.2, 4: 10.5, 8: 11.0, 16: 12.0, 25: 14.0, 50: 20.0, 100: 36.0}   # flat c(b)
    cpu_like = {b: 10.0 * b for b in (1, 2, 4, 8, 16, 25, 50, 100)}                          # linear c(b)
    assert choose_layout(builtin, batch(1, profile=gpu_like), 4)[0] == "sharded"
    layout, pred = choose_layout(builtin, batch(8, profile=cpu_like), 4)
    assert layout == "data-parallel" and pred["data_parallel_ms"] < pred["sharded_ms"]
    assert choose_layout(builtin, batch(8, profile=cpu_like, solver="serial"), 4)[0] == "data-parallel"
    # serial: a sharded gang would repeat the chain on every rank; one image goes to one rank
    assert choose_layout(builtin, batch(1, profile=cpu_like, solver="serial"), 4)[0] == "data-parallel"
    assert choose_layout(builtin, batch(8, profile=cpu_like), 4, forced="sharded")[0] == "sharded"
    parts = deal(batch(5), 2)
    assert [p.names for p in parts] == [["i0", "i1", "i2"], ["i3", "i4"]]
    assert deal(batch(1), 3)[1:] == [None, None]


def test_slo_caps_a_keys_batches(builtin):
    from deqir_dist.serve.plan import slo_batch_cap
    ex = FakeExecutor()
    ex.gate.clear()
    eng = Engine(ex, max_queue=16, max_batch=4, batch_wait_s=0.0,
                 batch_cap=lambda p, m: 2 if p.key == "slow" else m)
    eng.start()
    first = eng.submit(_prepared("first", "k0"), 30)
    time.sleep(0.1)
    jobs = [eng.submit(_prepared(f"{k}{i}", k), 30) for k in ("slow", "fast") for i in range(4)]
    ex.gate.set()
    for j in [first, *jobs]:
        j.future.result(10)
    eng.close()
    assert ex.batches[1:] == [["slow0", "slow1"], ["slow2", "slow3"], ["fast0", "fast1", "fast2", "fast3"]]
    # the cap from the cost model: serial, N = 100, c(b) = 10 b ms -> a batch of B takes 1000 B ms
    op = make_operator("sr_bicubic", image_shape=(3, 24, 24), scale=2)
    b = Batch(["a"], [0], torch.zeros((1, 3, 12, 12)), op,
              {"steps": 100, "solver": "serial", "profile": {k: 10.0 * k for k in (1, 2, 4, 8)}})
    assert slo_batch_cap(builtin, b, 1, 8, 2500.0) == 2
    assert slo_batch_cap(builtin, b, 1, 8, 500.0) == 1
    assert slo_batch_cap(builtin, b, 2, 8, 2500.0) == 4        # data-parallel over 2 ranks: 2 images each


def test_a_broken_gang_fails_everything_closed():
    """A rank's death (the watcher) while a batch runs and others wait: all get GangFailed (503),
    readiness is off for good, on_broken is called once, and nothing is accepted afterwards."""
    from deqir_dist.serve.engine import GangFailed
    ex = FakeExecutor()
    ex.gate.clear()
    told = []
    eng = Engine(ex, max_queue=8, max_batch=1, batch_wait_s=0.0, on_broken=told.append)
    eng.start()
    running = eng.submit(_prepared("run", "k"), 30)
    time.sleep(0.1)
    queued = eng.submit(_prepared("wait", "k"), 30)
    eng.mark_broken("rank 1 (pid 1) exited with status -9")
    eng.mark_broken("rank 1 again")
    for j in (running, queued):
        with pytest.raises(GangFailed, match="rank 1 \\(pid 1\\)"):
            j.future.result(1)
    assert not eng.ready and told == ["rank 1 (pid 1) exited with status -9"]
    with pytest.raises(GangFailed):
        eng.submit(_prepared("late", "k"), 30)
    assert 'deqir_gang_failures_total 1' in eng.metrics.render()
    ex.gate.set()
    eng.close(timeout=5)

"""deqir serve --ranks 2: a local gang (gloo on 127.0.0.1). Sharded replies match the CLI, a batch
matches its requests alone, a dead or hung rank fails in-flight work with 503 within the
collective timeout and the server exits 3, SIGTERM drains and exits 0 with the ranks stopped."""
from __future__ import annotations

import concurrent.futures
import io
import json
import signal
import time

import numpy as np
import psutil
import pytest
from PIL import Image

from tests.test_serve import FAST, Server, _cli, cache, files  # noqa: F401  (fixtures)

GANG = [*FAST, "--ranks", "2", "--solver", "picard"]


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def _follower(s: Server) -> int:
    status, body = s.get("/health/ready")
    assert status == 200
    doc = json.loads(body)
    assert doc["ranks"] == 2
    return doc["pids"][1]


def test_gang_serves_sharded_and_batches_exactly(cache, files, tmp_path):  # noqa: F811
    meas = sorted((files / "meas").glob("*.png"))
    want = _cli(meas, tmp_path / "cli", cache, "--solver", "picard")
    s = Server([*GANG, "--max-batch", "4", "--batch-wait-ms", "300"], cache)
    try:
        alone = {}
        for p in meas:
            status, headers, body = s.restore({"image": (p.name, p.read_bytes())})
            assert status == 200, body
            assert headers["x-deqir-plan"] == "chain sharded over 2 ranks" and headers["x-deqir-solver"] == "picard"
            # sharded = one process up to float rounding (parallel.dist: <= 1e-5): at most one 8-bit level
            assert np.abs(_pixels(body) - _pixels(want[p.name])).max() <= 1
            alone[p.name] = body
        with concurrent.futures.ThreadPoolExecutor(len(meas)) as pool:
            got = list(pool.map(lambda p: s.restore({"image": (p.name, p.read_bytes())}), meas))
        assert max(int(g[1]["x-deqir-batch-size"]) for g in got) > 1
        for p, (status, _, body) in zip(meas, got):
            assert status == 200 and body == alone[p.name]           # the gang's batch == the gang alone
    finally:
        code = s.stop()
    assert code == 0, s.stderr()


@pytest.mark.parametrize("how", ["kill", pytest.param("hang", marks=pytest.mark.slow)])     # hang: ~17 s
def test_a_dead_or_hung_rank_gives_503_in_time_and_exit_3(cache, files, how):  # noqa: F811
    good = sorted((files / "meas").glob("*.png"))[0].read_bytes()
    timeout = 6
    s = Server([*GANG, "--steps", "400", "--dist-timeout", str(timeout), "--max-batch", "1"], cache)
    follower = psutil.Process(_follower(s))
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(s.restore, {"image": ("a.png", good)})
            time.sleep(1.5)
            queued = pool.submit(s.restore, {"image": ("b.png", good)})
            time.sleep(0.3)
            t0 = time.monotonic()
            follower.send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            results = [running.result(60), queued.result(60)]
            waited = time.monotonic() - t0
        for status, headers, body in results:
            assert status == 503, body
            assert "gang" in json.loads(body)["error"] and headers.get("retry-after")
        assert waited < timeout + 10, waited           # the collective timeout, its grace, no hang
        assert s.proc.wait(30) == 3
        assert "the gang broke" in s.stderr()
    finally:
        if follower.is_running():
            follower.kill()
        if s.proc.poll() is None:
            s.proc.kill()


def test_gang_sigterm_drains_and_stops_the_ranks(cache, files):  # noqa: F811
    good = sorted((files / "meas").glob("*.png"))[0].read_bytes()
    s = Server([*GANG, "--steps", "30"], cache)
    follower = psutil.Process(_follower(s))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(s.restore, {"image": ("d.png", good)})
        time.sleep(0.7)
        s.proc.send_signal(signal.SIGTERM)
        follower.send_signal(signal.SIGTERM)         # a signal to the whole group: followers wait for rank 0
        status, _, body = fut.result(60)
    assert status == 200 and body[:4] == b"\x89PNG"
    assert s.proc.wait(30) == 0, s.stderr()
    follower.wait(10)
    assert not follower.is_running()


@pytest.mark.slow          # ~15-25 s: a gang and a CLI run
def test_data_parallel_gives_the_cli_bytes(cache, files, tmp_path):  # noqa: F811
    """--plan data-parallel: each rank restores its own images in one process: deqir restore's bytes."""
    meas = sorted((files / "meas").glob("*.png"))
    want = _cli(meas, tmp_path / "cli", cache, "--solver", "picard")
    s = Server([*GANG, "--plan", "data-parallel", "--max-batch", "4", "--batch-wait-ms", "400"], cache)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(meas)) as pool:
            got = list(pool.map(lambda p: s.restore({"image": (p.name, p.read_bytes())}), meas))
        assert any(g[1]["x-deqir-plan"].startswith("data-parallel over 2 rank(s)") for g in got), [g[1] for g in got]
        for p, (status, _, body) in zip(meas, got):
            assert status == 200 and body == want[p.name]
        assert 'deqir_batches_total{plan="data-parallel"}' in s.get("/metrics")[1].decode()
    finally:
        assert s.stop() == 0, s.stderr()


def test_live_while_starting_ready_only_when_warm(cache):  # noqa: F811
    """While the ranks join and warm up, /health/live answers 200 and /health/ready 503."""
    import socket
    import subprocess
    import sys
    import http.client
    from tests.test_serve import ROOT, _env
    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "deqir_dist", "serve", "--port", str(port), *GANG],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cache), cwd=ROOT)
    seen = set()
    try:
        t_end = time.monotonic() + 120
        while time.monotonic() < t_end:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health/live")
                live = c.getresponse().status
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health/ready")
                ready = c.getresponse().status
            except OSError:
                time.sleep(0.05)
                continue
            assert live == 200
            seen.add(ready)
            if ready == 200:
                break
            time.sleep(0.05)
        assert seen == {503, 200}, seen                # answered while starting, then ready
        assert proc.stdout.readline().strip() == f"serving on http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


@pytest.mark.slow          # ~20 s: torchrun, two ranks, a CLI run
def test_under_torchrun_rank_0_serves_and_the_others_follow(cache, files, tmp_path):  # noqa: F811
    import subprocess
    import sys
    import threading
    from tests.test_serve import ROOT, _env
    meas = sorted((files / "meas").glob("*.png"))
    want = _cli(meas, tmp_path / "cli", cache, "--solver", "picard")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "deqir_dist", "serve", "--port", "0", *FAST, "--solver", "picard",
                             "--max-batch", "2", "--batch-wait-ms", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=_env(cache), cwd=ROOT)
    try:
        out = []
        t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
        t.start()
        t.join(120)
        assert out and out[0].startswith("serving on http://127.0.0.1:"), out
        s = Server.__new__(Server)
        s.proc, s.port = proc, int(out[0].strip().rsplit(":", 1)[1])
        assert json.loads(s.get("/health/ready")[1])["ranks"] == 2
        status, headers, body = s.restore({"image": (meas[0].name, meas[0].read_bytes())})
        assert status == 200 and headers["x-deqir-plan"] == "chain sharded over 2 ranks (torchrun)"
        assert np.abs(_pixels(body) - _pixels(want[meas[0].name])).max() <= 1
        pair = meas[1:3]            # two together: one image per rank beats sharding both (c(b) ~ b on a CPU)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            got = list(pool.map(lambda p: s.restore({"image": (p.name, p.read_bytes())}), pair))
        for p, (status, headers, body) in zip(pair, got):
            assert status == 200 and headers["x-deqir-plan"].startswith("data-parallel over 2 rank(s)"), headers
            assert body == want[p.name]                # each rank restored its own: the CLI's bytes
    finally:
        proc.send_signal(signal.SIGTERM)              # torchrun stops every rank
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

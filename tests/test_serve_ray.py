"""deqir serve --ray: a Ray Serve deployment on a local Ray (127.0.0.1), one gang per replica.

Oracles: the PNG ``deqir restore`` writes (a data-parallel reply: byte for byte; a reply sharded
over the gang: within one 8-bit level, as the plain gang's); a rank SIGKILLed by pid turns the
replica unready (503) at once, Serve's health check (``check_health``) fails and Serve replaces
the replica with a fresh gang that serves the same bytes; the flags' checks and a missing
ray[serve] are one line, exit 2, before Ray starts."""
from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("starlette")
pytest.importorskip("multipart")

from deqir_dist.apps.cli import build_parser, main  # noqa: E402
from deqir_dist.errors import DeqirError  # noqa: E402
from tests.test_serve import FAST, ROOT, _cli, _env, _readline, cache, files, multipart  # noqa: E402,F401

RAY_FLAGS = ["--ray", "--ranks", "2", *FAST, "--solver", "picard", "--max-batch", "2", "--batch-wait-ms", "1000",
             "--health-check-period", "1"]


def _args(argv):
    return build_parser().parse_args(["serve", *argv])


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


def _get(port: int, path: str, timeout: float = 30):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.read()


def _restore(port: int, path, fields: dict | None = None):
    body, ctype = multipart({"image": (path.name, path.read_bytes())}, fields or {})
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    c.request("POST", "/v1/restore", body=body, headers={"Content-Type": ctype})
    r = c.getresponse()
    return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


@pytest.fixture(scope="module")
def ray_serve_app(cache):  # noqa: F811
    """A local Ray (2 CPUs, 127.0.0.1) with the deployment: 1 replica, a gang of 2 ranks."""
    from ray import serve

    from deqir_dist.apps.serve import engine_and_app
    from deqir_dist.apps.serve_ray import deploy
    from deqir_dist.serve.gang import free_port
    saved = {k: os.environ.get(k) for k in ("DEQIR_CACHE_DIR", "OMP_NUM_THREADS")}
    os.environ.update(DEQIR_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")   # Ray's workers inherit them
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 1024**2,
                 _node_ip_address="127.0.0.1")
    try:
        port = free_port()
        deploy(_args(RAY_FLAGS), 1 << 24, port, engine_and_app)
        yield port
    finally:
        try:
            serve.shutdown()
        finally:
            if started:
                ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _ready(port: int):
    try:
        status, body = _get(port, "/health/ready", timeout=3)
        return status, json.loads(body)
    except (OSError, ValueError):
        return None, None


def test_ray_serve_gives_the_cli_bytes_and_a_dead_rank_gets_its_replica_replaced(ray_serve_app, files, cache,
                                                                                 tmp_path):  # noqa: F811
    port = ray_serve_app
    meas = sorted((files / "meas").glob("*.png"))
    want = _cli(meas, tmp_path / "cli", cache, "--solver", "picard")
    status, doc = _ready(port)
    assert status == 200 and doc["ranks"] == 2 and len(doc["pids"]) == 2, doc
    # one request: its chain sharded over the replica's gang (rank 0 = the replica, rank 1 = an actor)
    status, headers, body = _restore(port, meas[0])
    assert status == 200, body
    assert headers["x-deqir-plan"] == "chain sharded over 2 ranks (Ray)" and headers["x-deqir-solver"] == "picard"
    assert np.abs(_pixels(body) - _pixels(want[meas[0].name])).max() <= 1
    # two together: each rank restores its own (the rank actor's data-parallel path): the CLI's bytes
    pair = meas[1:3]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda p: _restore(port, p), pair))
    for p, (status, headers, body) in zip(pair, got):
        assert status == 200 and headers["x-deqir-plan"].startswith("data-parallel over 2 rank(s)"), headers
        assert body == want[p.name]
    text = _get(port, "/metrics")[1].decode()     # the deployment's sum through the hub (serve.ray_metrics)
    assert 'deqir_requests_total{outcome="ok"} 3' in text and "\ndeqir_replicas 1\n" in text, text
    # the replica's gang lives in one placement group of P bundles, STRICT_PACK (one node)
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] == "CREATED"]
    assert len(groups) == 1 and groups[0]["strategy"] == "STRICT_PACK", groups
    assert list(groups[0]["bundles"].values()) == [{"CPU": 1.0}, {"CPU": 1.0}], groups

    # SIGKILL the rank actor by pid while a long sharded request runs: that request gets 503 at
    # once (not after --dist-timeout), the replica is unready, and Serve replaces it
    old = doc["pids"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(_restore, port, meas[0], {"steps": "400"})
        time.sleep(1.5)
        t0 = time.monotonic()
        os.kill(old[1], signal.SIGKILL)
        status, headers, body = running.result(60)
    assert status == 503 and "gang" in json.loads(body)["error"] and headers.get("retry-after"), body
    assert time.monotonic() - t0 < 10
    while True:
        status, doc = _ready(port)
        if status == 503:
            break
        assert time.monotonic() - t0 < 5, (status, doc)
        time.sleep(0.05)
    assert doc["status"] == "broken" and f"pid {old[1]}" in doc["error"], doc
    while True:                                  # check_health raised: a fresh replica, a fresh gang
        status, doc = _ready(port)
        if status == 200 and not set(doc["pids"]) & set(old):
            break
        assert time.monotonic() - t0 < 120, (status, doc)
        time.sleep(0.2)
    from ray import serve
    assert serve.status().applications["deqir"].deployments["deqir"].replica_states == {"RUNNING": 1}
    status, headers, body = _restore(port, meas[0])
    assert status == 200 and np.abs(_pixels(body) - _pixels(want[meas[0].name])).max() <= 1
    # /metrics: the replaced replica's numbers leave the sum (withdrawn when it stopped, or silent
    # past STALE_S); the fresh one's first request is counted
    from deqir_dist.serve.ray_metrics import STALE_S
    t1 = time.monotonic()
    while True:
        text = _get(port, "/metrics")[1].decode()
        if "\ndeqir_replicas 1\n" in text and 'deqir_requests_total{outcome="ok"} 1\n' in text:
            break
        assert time.monotonic() - t1 < STALE_S + 10, text
        time.sleep(0.5)


def test_ray_serve_options_pass_autoscaling_through():
    from deqir_dist.apps.serve_ray import deployment_options
    opts = deployment_options(_args(["--ray", "--ranks", "3", "--threads", "2"]), gpus=False)
    assert opts["num_replicas"] == 1 and "autoscaling_config" not in opts
    assert opts["placement_group_bundles"] == [{"CPU": 2.0}] * 3 and opts["placement_group_strategy"] == "STRICT_PACK"
    assert opts["ray_actor_options"] == {"num_cpus": 2.0, "num_gpus": 0}
    cfg = {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 3}
    opts = deployment_options(_args(["--ray", "--autoscaling-config", json.dumps(cfg)]), gpus=True)
    assert opts["autoscaling_config"] == cfg and "num_replicas" not in opts
    assert opts["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 1.0}]


@pytest.mark.parametrize("argv, says", [
    (["--ray", "--autoscaling-config", "{\"min_replicas\": 3, \"max_replicas\": 1}"], "--autoscaling-config"),
    (["--ray", "--autoscaling-config", "[1, 2]"], "must be a JSON object"),
    (["--ray", "--autoscaling-config", "{oops"], "neither a file nor JSON"),
    (["--ray", "--replicas", "2", "--autoscaling-config", "{}"], "not both"),
    (["--ray", "--replicas", "0"], "--replicas"),
    (["--ray", "--health-check-period", "nan"], "--health-check-period"),
    (["--replicas", "2"], "belong to --ray"),
])
def test_ray_serve_bad_flags_are_one_line_before_ray_starts(argv, says, capsys, monkeypatch):
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deqir: error: ") and says in err and "\n" not in err, err


def test_without_ray_serve_it_says_which_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray.serve", None)     # `from ray import serve` raises ImportError
    monkeypatch.delattr(ray, "serve", raising=False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started"))
    assert main(["serve", "--ray"]) == 2
    assert capsys.readouterr().err.strip() == \
        "deqir: error: deqir serve --ray needs Ray Serve: pip install 'deqir-dist[ray-serve]'"
    from deqir_dist.apps.serve_ray import ray_serve
    with pytest.raises(DeqirError, match=r"\[ray-serve\]"):
        ray_serve()


@pytest.mark.slow          # ~30 s: the CLI starts its own local Ray and Serve
def test_the_ray_cli_serves_and_sigterm_drains_and_exits_0(files, cache, tmp_path):  # noqa: F811
    meas = sorted((files / "meas").glob("*.png"))
    want = _cli(meas[:1], tmp_path / "cli", cache, "--steps", "200")
    env = dict(_env(cache), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0")
    proc = subprocess.Popen([sys.executable, "-m", "deqir_dist", "serve", "--ray", "--port", "0", *FAST,
                             "--steps", "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=ROOT)
    try:
        line = _readline(proc, 180)
        assert line.startswith("serving on http://127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        assert _restore(port, meas[0])[2] == want[meas[0].name]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            fut = pool.submit(_restore, port, meas[0])
            time.sleep(1.0)                      # in flight when SIGTERM arrives: it finishes
            proc.send_signal(signal.SIGTERM)
            status, _, body = fut.result(120)
        assert status == 200 and body == want[meas[0].name]
        assert proc.wait(120) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_private_ray_too_small_for_the_gangs_is_one_line():
    """A private local Ray cannot grow: replicas x ranks x threads CPUs must be there, else one line (no wait)."""
    from deqir_dist.apps.serve_ray import _check_fits
    _check_fits(_args(["--ray", "--replicas", "2", "--ranks", "2"]), {"CPU": 4.0})
    with pytest.raises(DeqirError, match=r"2 replica\(s\) x --ranks 3 x 1 CPU\(s\) need 6 CPUs; this machine's Ray "
                                         r"has 4"):
        _check_fits(_args(["--ray", "--replicas", "2", "--ranks", "3"]), {"CPU": 4.0})
    with pytest.raises(DeqirError, match="need 4 CPUs"):
        _check_fits(_args(["--ray", "--ranks", "2", "--autoscaling-config",
                           '{"min_replicas": 2, "max_replicas": 3}']), {"CPU": 2.0})


@pytest.mark.slow          # ~20 s: the CLI starts its own local Ray
def test_a_replica_that_cannot_start_is_one_line_and_exit_2(tmp_path, cache):  # noqa: F811
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"\0" * 64)
    env = dict(_env(cache), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="disabled",
               RAY_USAGE_STATS_ENABLED="0")
    r = subprocess.run([sys.executable, "-m", "deqir_dist", "serve", "--ray", "--port", "0", "--model", "builtin",
                        "--checkpoint", str(bad), *FAST], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=240)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("deqir: error: the Ray Serve deployment did not start: ") and "checkpoint" in lines[0]
    assert r.stdout == ""

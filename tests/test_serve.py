"""deqir serve: a real server on 127.0.0.1 (port 0) in a subprocess, against the CLI's bytes.

Oracles: the PNG ``deqir restore`` writes for the same file, flags and seed; the same request
alone vs inside a batch (bit-identical); hostile uploads give one-line 4xx and the server stays
ready, in a process whose address space is capped (RLIMIT_AS)."""
from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")

from deqir_dist.apps.cli import main  # noqa: E402
from deqir_dist.io.images import write_image  # noqa: E402
from tests.test_hostile import png_bomb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--steps", "4", "--threads", "1"]
MEM_CAP = 4 << 30


def _env(cache: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), DEQIR_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    return env


class Server:
    """``deqir serve --port 0 ...`` in a child process (address space capped); its port from the line."""

    def __init__(self, args: list[str], cache: Path, timeout: float = 60.0):
        def cap():
            resource.setrlimit(resource.RLIMIT_AS, (MEM_CAP, MEM_CAP))
        self.proc = subprocess.Popen([sys.executable, "-m", "deqir_dist", "serve", "--port", "0", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(cache),
                                     cwd=ROOT, preexec_fn=cap)
        line = _readline(self.proc, timeout)
        assert line.startswith("serving on http://127.0.0.1:"), (line, self.stderr())
        self.port = int(line.rsplit(":", 1)[1])

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(running)"
        return self.proc.stderr.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def get(self, path: str):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()

    def restore(self, files: dict, fields: dict | None = None, headers: dict | None = None, timeout: float = 120):
        """POST /v1/restore; files: field -> (filename, bytes). Returns (status, headers, body)."""
        body, ctype = multipart(files, fields or {})
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        c.request("POST", "/v1/restore", body=body, headers={"Content-Type": ctype, **(headers or {})})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()


def _readline(proc, timeout: float) -> str:
    out = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    return out[0].strip() if out else ""


def multipart(files: dict, fields: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode())
    for k, (name, data) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"; filename="{name}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def _clean(path: Path, size: int = 24, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    write_image(path, torch.rand((3, size, size), generator=g) * 2 - 1)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    clean = d / "clean"
    clean.mkdir()
    for i in range(3):
        _clean(clean / f"im{i}.png", seed=i)
    assert main(["degrade", str(clean), "--task", "sr_bicubic", "--scale", "2", "-o", str(d / "meas")]) == 0
    return d


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _cli(files_: list[Path], out: Path, cache: Path, *flags) -> dict[str, bytes]:
    """What deqir restore writes (a child process: the same cache and threads as the server)."""
    r = subprocess.run([sys.executable, "-m", "deqir_dist", "restore", *map(str, files_), *FAST, *flags,
                        "--no-progress", "-o", str(out)], env=_env(cache), cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    return {f"{p.stem}.png": (out / f"{p.stem}.png").read_bytes() for p in files_}


@pytest.fixture(scope="module")
def server(cache):
    s = Server([*FAST, "--max-batch", "4", "--batch-wait-ms", "300"], cache)
    yield s
    assert s.stop() == 0, s.stderr()


def test_served_png_is_the_cli_png(server, files, cache, tmp_path):
    meas = sorted((files / "meas").glob("*.png"))
    want = _cli(meas, tmp_path / "cli", cache)
    for p in meas:
        status, headers, body = server.restore({"image": (p.name, p.read_bytes())})
        assert status == 200, body
        assert headers["content-type"] == "image/png"
        assert body == want[p.name]
        for h in ("x-request-id", "x-deqir-solver", "x-deqir-plan", "x-deqir-iterations", "x-deqir-queue-ms",
                  "x-deqir-solve-ms"):
            assert h in headers
        assert headers["x-deqir-iterations"] == "4"
    # JSON: the same PNG in base64, the settings and where they came from
    status, headers, body = server.restore({"image": (meas[0].name, meas[0].read_bytes())},
                                           headers={"Accept": "application/json"})
    assert status == 200
    doc = json.loads(body)
    assert base64.b64decode(doc["image_b64"]) == want[meas[0].name]
    assert doc["id"] == meas[0].stem and doc["settings"]["steps"] == 4 and doc["settings_source"]["steps"] == "user"
    assert doc["task"] == "sr_bicubic" and doc["timings"]["total_ms"] > 0


def test_a_gray_picture_is_served_gray_as_the_cli_writes_it(server, cache, tmp_path):
    """Three equal channels (a grayscale photograph read as RGB): deqir restore writes a gray PNG
    (dataset.items.keep_gray), and so must the server: a measurement and a from_clean picture."""
    from PIL import Image
    g = torch.Generator().manual_seed(5)
    clean = tmp_path / "gray.png"
    write_image(clean, (torch.rand((1, 24, 24), generator=g) * 2 - 1).expand(3, -1, -1))
    assert main(["degrade", str(clean), "--task", "sr_bicubic", "--scale", "2", "-o", str(tmp_path / "meas")]) == 0
    meas = tmp_path / "meas" / "gray.png"
    want = _cli([meas], tmp_path / "cli", cache)
    status, _, body = server.restore({"image": ("gray.png", meas.read_bytes())})
    assert status == 200 and body == want["gray.png"], body[:200]
    assert Image.open(io.BytesIO(body)).mode == "L"
    want = _cli([clean], tmp_path / "cli2", cache, "--task", "sr_bicubic", "--scale", "2", "--from-clean")
    status, _, body = server.restore({"image": ("gray.png", clean.read_bytes())},
                                     {"task": "sr_bicubic", "scale": "2", "from_clean": "true"},
                                     headers={"Accept": "application/json"})
    doc = json.loads(body)
    assert status == 200 and base64.b64decode(doc["image_b64"]) == want["gray.png"], doc
    cli = json.loads((tmp_path / "cli2" / "summary.json").read_text())["images"][0]
    assert doc["psnr"] == cli["psnr"] and doc["ssim"] == cli["ssim"]       # metrics of the gray picture


def test_fields_are_the_cli_flags(server, files, cache, tmp_path):
    """from_clean with a seed, another task and a sigma_y: the CLI's bytes for the same flags."""
    src = files / "clean" / "im1.png"
    flags = ["--task", "inpaint", "--mask", "random", "--mask-fraction", "0.3", "--seed", "7", "--sigma-y", "0.05",
             "--solver", "picard"]
    want = _cli([src], tmp_path / "cli", cache, *flags, "--from-clean")
    fields = {"task": "inpaint", "mask": "random", "mask_fraction": "0.3", "seed": "7", "sigma-y": "0.05",
              "solver": "picard", "from_clean": "true"}
    status, headers, body = server.restore({"image": ("im1.png", src.read_bytes())}, fields,
                                           headers={"Accept": "application/json"})
    assert status == 200, body
    doc = json.loads(body)
    assert base64.b64decode(doc["image_b64"]) == want["im1.png"]
    assert doc["solver"] == "picard" and "psnr" in doc
    # an uploaded mask image: the CLI's --mask FILE
    mask = torch.ones((1, 24, 24))
    mask[:, 6:14, 8:20] = -1
    write_image(tmp_path / "mask.png", mask)
    want = _cli([src], tmp_path / "cli_mask", cache, "--task", "inpaint", "--mask", str(tmp_path / "mask.png"),
                "--from-clean")
    status, _, body = server.restore({"image": ("im1.png", src.read_bytes()),
                                      "mask": ("hole.png", (tmp_path / "mask.png").read_bytes())},
                                     {"task": "inpaint", "from_clean": "1"})
    assert status == 200, body
    assert body == want["im1.png"]
    # the id is the upload's name: another name, other noise, other bytes
    status, _, other = server.restore({"image": ("renamed.png", src.read_bytes())}, fields)
    assert status == 200 and other != want["im1.png"]


def test_batch_gives_each_request_its_alone_bytes(server, files, cache, tmp_path):
    meas = sorted((files / "meas").glob("*.png"))
    want = _cli(meas, tmp_path / "cli", cache)
    with concurrent.futures.ThreadPoolExecutor(len(meas)) as pool:
        got = list(pool.map(lambda p: server.restore({"image": (p.name, p.read_bytes())}), meas))
    assert [g[0] for g in got] == [200] * len(meas)
    assert max(int(g[1]["x-deqir-batch-size"]) for g in got) > 1       # they did share a call
    for p, (_, _, body) in zip(meas, got):
        assert body == want[p.name]


def _claims_4096() -> bytes:
    import numpy as np

    from deqir_dist.io.images import _png16_encode
    from deqir_dist.io.pngtext import add_text
    desc = {"format": 1, "sigma_y": 0.0, "bits": 16, "task": "sr_avgpool", "image_shape": [3, 4096, 4096],
            "params": {"scale": 256}}
    return add_text(_png16_encode(np.zeros((16, 16, 3), np.uint16)), {"deqir-measurement": json.dumps(desc)})


def test_hostile_uploads_are_one_line_4xx_and_the_server_stays_ready(server, files, tmp_path):
    good = sorted((files / "meas").glob("*.png"))[0].read_bytes()
    bomb = png_bomb(tmp_path / "bomb.png", 12000, 12000).read_bytes()            # 144 M pixels in ~140 KB
    cases = {
        "bomb": ({"image": ("bomb.png", bomb)}, {"task": "sr_bicubic", "scale": "2"}, 413, "over the cap"),
        "bomb, no task": ({"image": ("bomb.png", bomb)}, {}, 413, "over the cap"),
        "truncated": ({"image": ("t.png", good[: len(good) // 2])}, {}, 400, ""),
        "not an image": ({"image": ("x.png", b"hello, I am text" * 10)}, {"task": "sr_bicubic"}, 400, ""),
        "no image field": ({"picture": ("x.png", good)}, {}, 400, "'image'"),
        "no suffix": ({"image": ("x", good)}, {}, 400, "suffix"),
        "bad value": ({"image": ("x.png", good)}, {"steps": "-3"}, 400, "steps"),
        "nan": ({"image": ("x.png", good)}, {"etw": "nan"}, 400, ""),
        "server-only field": ({"image": ("x.png", good)}, {"model": "analytic"}, 400, "unknown field"),
        "a path as mask": ({"image": ("x.png", good)}, {"task": "inpaint", "mask": "/etc/hostname"}, 400,
                           "file field 'mask'"),
        "contradiction": ({"image": ("x.png", good)}, {"task": "sr_bicubic", "scale": "4"}, 400, ""),
        # 16x16 pixels whose description claims 4096x4096: estimated from the header (api.budget), refused
        # before its operator is built, naming the size that fits (the server runs under RLIMIT_AS 4 GB)
        "claims 4096x4096": ({"image": ("c.png", _claims_4096())}, {}, 413, "4096x4096 image"),
    }
    for what, (fs, fields, status, text) in cases.items():
        got, headers, body = server.restore(fs, fields)
        assert got == status, (what, body)
        doc = json.loads(body)
        assert set(doc) == {"error"} and "\n" not in doc["error"] and text in doc["error"], (what, doc)
    # not multipart
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    c.request("POST", "/v1/restore", body=b"{}", headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 415 and "multipart" in json.loads(r.read())["error"]
    # a huge body: refused from its Content-Length, nothing read
    c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    c.putrequest("POST", "/v1/restore")
    c.putheader("Content-Type", "multipart/form-data; boundary=x")
    c.putheader("Content-Length", str(1 << 40))
    c.endheaders()
    r = c.getresponse()
    assert r.status == 413 and "over the cap" in json.loads(r.read())["error"]
    c.close()
    assert server.get("/health/ready")[0] == 200
    status, _, _ = server.restore({"image": ("x.png", good)})
    assert status == 200
    metrics = server.get("/metrics")[1].decode()
    assert 'deqir_requests_total{outcome="too_large"}' in metrics and "deqir_batch_size_bucket" in metrics


def test_streamed_body_over_the_cap_is_413(cache, files):
    """No Content-Length (chunked): counted as it arrives, refused past --max-body-bytes."""
    s = Server([*FAST, "--max-body-bytes", "100000"], cache)
    try:
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        body, ctype = multipart({"image": ("big.png", os.urandom(400_000))}, {})
        c.request("POST", "/v1/restore", body=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                  headers={"Content-Type": ctype}, encode_chunked=True)
        r = c.getresponse()
        assert r.status == 413, r.read()
        assert s.get("/health/ready")[0] == 200
    finally:
        assert s.stop() == 0


def test_over_the_work_cap_is_413_before_any_work(cache, files):
    """--max-time: a request whose modelled time is over the server's cap is a one-line 413 (a cap,
    like the pixel and byte caps: errors.TooLarge), counted as too_large; a small one is served."""
    good = sorted((files / "meas").glob("*.png"))[0].read_bytes()
    s = Server([*FAST, "--max-time", "0.001"], cache)       # 60 ms of modelled work
    try:
        status, _, body = s.restore({"image": ("x.png", good)}, {"steps": "1000"})
        doc = json.loads(body)
        assert status == 413 and "work cap" in doc["error"] and "\n" not in doc["error"], (status, doc)
        assert s.restore({"image": ("x.png", good)}, {"steps": "1"})[0] == 200
        assert 'deqir_requests_total{outcome="too_large"} 1' in s.get("/metrics")[1].decode()
    finally:
        assert s.stop() == 0


def test_full_queue_is_429_and_late_is_504(cache, files):
    good = sorted((files / "meas").glob("*.png"))[0]
    s = Server(["--steps", "300", "--threads", "1", "--solver", "serial", "--max-queue", "1", "--max-batch", "1",
                "--request-timeout", "4"], cache)
    try:
        def one(i):
            return s.restore({"image": (f"q{i}.png", good.read_bytes())})
        with concurrent.futures.ThreadPoolExecutor(5) as pool:
            got = list(pool.map(one, range(5)))
        statuses = sorted(g[0] for g in got)
        assert 429 in statuses, statuses
        for status, headers, body in got:
            if status == 429:
                assert int(headers["retry-after"]) >= 1 and "queue is full" in json.loads(body)["error"]
        assert set(statuses) <= {200, 429, 504}
        status, _, body = s.restore({"image": ("late.png", good.read_bytes())}, {"steps": "1000"})
        assert status == 504 and "deadline" in json.loads(body)["error"]
        assert s.get("/health/ready")[0] == 200
        # a client that leaves: its image stops at the next stopping decision, the gang is free at once
        body, ctype = multipart({"image": ("gone.png", good.read_bytes())}, {"steps": "1000"})
        c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        c.request("POST", "/v1/restore", body=body, headers={"Content-Type": ctype})
        time.sleep(1.0)
        c.sock.shutdown(2)
        c.close()
        t0 = time.monotonic()
        status, _, _ = s.restore({"image": ("next.png", good.read_bytes())}, {"steps": "4"})
        assert status == 200 and time.monotonic() - t0 < 3.5       # 1000 steps would hold it ~10 s
        assert 'deqir_requests_total{outcome="cancelled"} 1' in s.get("/metrics")[1].decode()
    finally:
        assert s.stop() == 0


def test_sigterm_drains_in_flight_and_exits_0(cache, files):
    good = sorted((files / "meas").glob("*.png"))[0]
    s = Server(["--steps", "150", "--threads", "1", "--solver", "serial"], cache)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fut = pool.submit(s.restore, {"image": ("d.png", good.read_bytes())})
        time.sleep(1.0)
        s.proc.send_signal(signal.SIGTERM)
        status, headers, body = fut.result(60)
    assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n"
    assert s.proc.wait(30) == 0


def test_without_the_extra_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    assert main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "deqir: error: deqir serve needs the serve extra: pip install 'deqir-dist[serve]'"


def test_a_model_that_cannot_load_is_one_line_exit_2(cache):
    r = subprocess.run([sys.executable, "-m", "deqir_dist", "serve", "--port", "0", "--model", "/nonexistent.pt"],
                       env=_env(cache), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["deqir: error: checkpoint file not found: /nonexistent.pt"]


@pytest.mark.parametrize("argv,text", [(["--port", "70000"], "--port"), (["--max-batch", "0"], "--max-batch"),
                                       (["--steps", "0"], "steps"), (["--request-timeout", "nan"], "--request-timeout")])
def test_bad_server_flags_are_one_line_before_anything_starts(argv, text, capsys):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deqir: error:") and "\n" not in err and text in err, err

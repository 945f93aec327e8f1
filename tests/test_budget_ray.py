"""ray-restore's per-image path under the same checks as deqir restore (issue 25): the driver checks
the size each input's header or PNG description declares against the pixel cap before shipping it
(a failed record, the file never read by a worker), and each worker estimates an image's memory and
work (api.budget, the work cap --max-time) from that header before decoding it."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.test_budget import _zeros_png
from tests.test_ray import SR2, _photos, _records, _summary

ray = pytest.importorskip("ray")

ROOT = Path(__file__).resolve().parents[1]


def _claims(path: Path, side: int, scale: int | None = None) -> Path:
    """A 16x16 PNG (a few hundred bytes) whose deqir-measurement description claims a side x side image."""
    desc = {"format": 1, "sigma_y": 0.0, "bits": 8, "task": "sr_avgpool", "image_shape": [3, side, side],
            "params": {"scale": scale or side // 16}}
    return _zeros_png(path, 16, 16, {"deqir-measurement": json.dumps(desc)})


WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from deqir_dist.ray.worker import RestoreWorker
    d = Path(sys.argv[1])
    out = {}
    for name, model, restore in json.loads(sys.argv[2]):
        spec = {"model": model, "device": "cpu", "threads": 1, "task": "sr_avgpool", "restore": restore, "seed": 0,
                "from_clean": False, "bits": 8, "batch": False}
        w = RestoreWorker(spec)
        item = {"id": name, "source": f"/src/{name}.png", "suffix": ".png", "data": (d / "claims4096.png").read_bytes(),
                "gt_data": None, "gt_source": None, "gt_suffix": "", "op_params": {"scale": 256}, "sigma_y": None,
                "config": "h"}
        rec = w.restore_batch([item])[0]
        out[name] = {k: rec[k] for k in ("status", "error")}
    with open("/proc/self/status") as fh:
        out["rss_mb"] = next(int(ln.split()[1]) for ln in fh if ln.startswith("VmHWM:")) / 1024
    print(json.dumps(out))
""")


def test_worker_refuses_a_4096_claim_from_its_header_before_decoding(tmp_path):
    """The 229-byte PNG claiming 4096x4096, shipped to a worker: one failed record naming the size that
    fits (the analytic model: its memory; the built-in prior: its work at the default cap, its
    tiles fitting in memory), in bounded memory (a child under RLIMIT_AS)."""
    _claims(tmp_path / "claims4096.png", 4096)
    cases = [("analytic", "analytic", {"steps": 5, "solver": "serial"}),
             ("builtin", "builtin", {"max_time": 1})]          # its tiles fit in memory; 1 minute of work does not

    def limit_as():       # room for the built-in prior's tiles (~3 GB): its work, not its memory, is refused
        resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DEQIR_CACHE_DIR": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", WORKER, str(tmp_path), json.dumps(cases)], capture_output=True,
                       timeout=180, preexec_fn=limit_as, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    got = json.loads(p.stdout.decode().splitlines()[-1])
    for name in ("analytic", "builtin"):
        rec = got[name]
        assert rec["status"] == "failed" and "\n" not in rec["error"], rec
        assert "/src/" in rec["error"] and "4096x4096 image" in rec["error"] and "at most about" in rec["error"], rec
    assert "more memory" in got["analytic"]["error"]
    assert "work cap" in got["builtin"]["error"] and "--max-time" in got["builtin"]["error"]
    assert got["rss_mb"] < 500, got


@pytest.fixture(scope="module")
def ray_session():
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    yield ray
    ray.shutdown()


def test_driver_records_a_declared_size_over_the_pixel_cap_without_shipping_it(ray_session, tmp_path, monkeypatch,
                                                                                capsys):
    """A few hundred bytes claiming 8192x8192 (over the default 16.8 Mpx cap): the driver records it as
    failed in one line from its description and never reads it into a batch; the rest of the job
    runs; a bad --max-time is one line before Ray."""
    from deqir_dist.apps.cli import main
    from deqir_dist.ray.pool import _Pool
    data = tmp_path / "data"
    _photos(data, 2, size=8)                # measurements of 8 px: x2 -> 16 px pictures
    _claims(data / "huge.png", 8192, scale=2)        # its flags agree with the job's: only its size is wrong
    shipped = []
    payload = _Pool._payload

    def spy(self, batch):
        shipped.extend(e.id for e, *_ in batch.entries)
        return payload(self, batch)
    monkeypatch.setattr(_Pool, "_payload", spy)
    out = tmp_path / "out"
    code = main(["ray-restore", str(data), "--address", "local", "--model", "analytic", "--steps", "4",
                 "--workers", "1", "--no-progress", *SR2, "-o", str(out)])
    assert code == 1                         # one image failed
    recs = {r["id"]: r for r in _records(out)}
    assert set(shipped) == {"img00", "img01"}, shipped      # (auto's plan reads a batch too)
    bad = recs["huge"]
    assert bad["status"] == "failed" and "\n" not in bad["error"], bad
    assert "8192x8192" in bad["error"] and "over the cap" in bad["error"] and "--max-pixels" in bad["error"], bad
    assert recs["img00"]["status"] == "ok" and (out / "img00.png").is_file() and not (out / "huge.png").exists()
    s = _summary(out)
    assert (s["ok"], s["failed"]) == (2, 1) and s["failures"][0]["id"] == "huge"
    capsys.readouterr()
    assert main(["ray-restore", str(data), "--model", "analytic", "--max-time", "soon", *SR2, "-o",
                 str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "--max-time" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "o2").exists()

"""torchrun with a serial plan (the CPU default): images are dealt over the ranks (rank r restores
images r, r + P, ...; dataset.dealt) instead of each rank running every chain, and the outputs are
byte-identical to one process's. Real torchrun, gloo, three ranks."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deqir_dist.apps.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _photos(d: Path, n: int) -> Path:
    d.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:16, 0:16]
    for i in range(n):
        img = np.stack([np.sin(xx / (3 + i)), np.cos(yy / (2 + i)), np.sin((xx + yy) / 6)], -1)
        img = ((img + 1) * 127.5 + rng.normal(0, 3, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img{i}.png")
    return d


def _torchrun(flags: list, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                           str(ROOT / "launch" / "restore.py"), *flags, "-o", str(out)],
                          capture_output=True, text=True, env=env, timeout=150)


def test_serial_images_are_dealt_over_torchrun_ranks_with_identical_outputs(tmp_path):
    photos = _photos(tmp_path / "photos", 5)           # 5 images on 3 ranks: a full round, then a part one
    base = [str(photos), "--from-clean", "--task", "sr_avgpool", "--scale", "2", "--model", "analytic",
            "--steps", "10", "--no-progress"]
    for solver in ("serial", "auto"):
        flags = [*base, "--solver", solver]
        one, three = tmp_path / f"one-{solver}", tmp_path / f"three-{solver}"
        assert main(["restore", *flags, "-o", str(one)]) == 0
        proc = _torchrun(flags, three)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("mean_iterations") == 1          # only rank 0 prints the summary
        notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("deqir: note:")]
        assert len(notes) == 1 and "dealt over the 3 ranks" in notes[0], proc.stderr[-2000:]
        for i in range(5):
            a, b = (one / f"img{i}.png").read_bytes(), (three / f"img{i}.png").read_bytes()
            assert a == b, (solver, i)
        summary = json.loads((three / "summary.json").read_text())
        recs = summary["images"]
        assert summary["world_size"] == 3 and [r["id"] for r in recs] == [f"img{i}" for i in range(5)]
        assert [r["dealt_to_rank"] for r in recs] == [0, 1, 2, 0, 1], recs
        assert all(r["solver"] == "serial" and r["iterations"] == 10 for r in recs)
        if solver == "auto":                  # auto's plan, decided once by rank 0, recorded with the image
            assert all(r["plan"]["chosen"] == "serial" for r in recs), recs
        single = json.loads((one / "summary.json").read_text())["images"]
        assert [r["psnr"] for r in recs] == [r["psnr"] for r in single]


@pytest.mark.slow
def test_a_rank_waits_out_a_long_image_past_the_collective_timeout(tmp_path):
    """One rank's image takes longer than --dist-timeout (8 s) while the other's is done at once: the
    dealt images' broadcasts go over their own group, whose timeout follows the work cap, so the
    waiting rank does not give up (over the default group it failed at 8 s)."""
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (384, 384, 3), dtype=np.uint8)).save(d / "big.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / "small.png")
    flags = [str(d), "--from-clean", "--task", "sr_avgpool", "--scale", "2", "--model", "analytic", "--steps", "400",
             "--solver", "serial", "--dist-timeout", "8", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "launch" / "restore.py"), *flags, "-o", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = json.loads((tmp_path / "two" / "summary.json").read_text())["images"]
    assert [r["dealt_to_rank"] for r in recs] == [0, 1] and recs[0]["seconds"] > 8, recs

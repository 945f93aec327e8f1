"""The red team's turn-3 findings (issue 25, shared/reference/reliability.md), one test each: every
hostile file is built here, and what could blow up or hang runs in a child under RLIMIT_AS and a
time limit (tests/test_hostile.py's ``_run_child``)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from deqir_dist.apps.cli import main
from deqir_dist.dataset.results import _ResultsLog, load_results
from deqir_dist.errors import DeqirError
from deqir_dist.io.images import _png16_encode
from deqir_dist.io.outdir import LOCK_NAME
from deqir_dist.io.pngtext import add_text
from deqir_dist.models.loading import read_state_dict
from tests.test_hostile import FAST, ROOT, SR2, _fails, _fake_measurement, _photos, _run_child, _tree

# ------------------------------------------------------------------------------ building hostile files


def _rezip_deflated(src: Path, dst: Path) -> Path:
    """``src`` (a torch.save archive) with every member deflated, streamed member by member."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            with zin.open(info) as r, zout.open(info.filename, "w", force_zip64=True) as w:
                for chunk in iter(lambda: r.read(1 << 22), b""):
                    w.write(chunk)
    return dst


BUILD = textwrap.dedent("""
    import json, sys, torch
    from pathlib import Path
    from tests.test_redteam import _rezip_deflated
    d = Path(sys.argv[1])
    op = json.dumps({"name": "cs_wht", "image_shape": [3, 64, 64], "params": {"ratio": 2, "seed": 0}})
    torch.save({"y": torch.zeros(3, 2 ** 25), "operator": op}, d / "big.pt")        # 400 MB of float zeros
    _rezip_deflated(d / "big.pt", d / "zipbomb.pt")
    (d / "big.pt").unlink()
    torch.save({"w": torch.zeros(2 ** 25)}, d / "bigck.pt")                         # 134 MB
    _rezip_deflated(d / "bigck.pt", d / "bomb_ckpt.pt")
    (d / "bigck.pt").unlink()
""")


def _build_in_child(folder: Path) -> None:
    import resource

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
    subprocess.run([sys.executable, "-c", BUILD, str(folder)], check=True, timeout=120, cwd=ROOT, preexec_fn=cap,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def described_png(path: Path, desc: dict | str, size: int = 16) -> Path:
    """A 16-bit PNG of zeros with ``desc`` as its deqir-measurement chunk (as deqir degrade writes)."""
    text = desc if isinstance(desc, str) else json.dumps(desc)
    path.write_bytes(add_text(_png16_encode(np.zeros((size, size, 3), np.uint16)), {"deqir-measurement": text}))
    return path


def _desc(task: str, params: dict, shape=(3, 16, 16)) -> dict:
    return {"format": 1, "sigma_y": 0.0, "bits": 16, "task": task, "image_shape": list(shape), "params": params}


DEEP = "[" * 30000 + "]" * 30000          # 60 KB, under every text cap: RecursionError in json.loads


def _one_line(r: dict, match: str) -> None:
    lines = [ln for ln in r["err"].splitlines() if ln.strip()]
    assert r["code"] == 2 and len(lines) == 1 and lines[0].startswith("deqir: error: ") and match in lines[0], r


# ------------------------------------------------------------------------------ compressed archives


def test_compressed_measurement_and_checkpoint_are_checked_before_inflating(tmp_path):
    """A deflated .pt measurement (400 MB of zeros in a few hundred KB) is refused from its zip
    directory, before torch.load inflates it (unchecked: +400 MB, and 6.7 GB for the red team's
    6 MB file); a deflated checkpoint that claims far more than a real one is refused the same way."""
    _build_in_child(tmp_path)
    bomb, ckpt = tmp_path / "zipbomb.pt", tmp_path / "bomb_ckpt.pt"
    assert bomb.stat().st_size < 3_000_000 and ckpt.stat().st_size < 1_000_000
    data = _photos(tmp_path / "data", 1)
    o = str(tmp_path / "out")
    results = _run_child([
        ("deflated .pt", ["restore", str(bomb), "--task", "cs_wht", "--ratio", "2", *FAST, "-o", o]),
        ("deflated .pt, no --task", ["restore", str(bomb), *FAST, "-o", o]),
        ("deflated checkpoint", ["restore", str(data), "--from-clean", *SR2, "--checkpoint", str(ckpt),
                                 "--steps", "3", "--no-progress", "-o", o]),
    ], timeout=120)
    _one_line(results[0], "compressed (deflated) members")
    _one_line(results[1], "compressed (deflated) members")
    _one_line(results[2], "would inflate to 1342")
    # the 500 MB: importing torch and the package is ~240 MB; inflating the measurement alone is 400 MB more
    assert max(r["rss_mb"] for r in results) < 500, results
    assert not Path(o).exists()
    with pytest.raises(DeqirError, match="would inflate to 1342"):
        read_state_dict(ckpt)


def test_a_deflated_checkpoint_loads_exactly_not_through_mmap(tmp_path):
    """torch.load(mmap=True) maps a deflated member's compressed bytes as the tensor (152/152 wrong
    for the builtin prior); a deflated checkpoint must load the same tensors as the stored one."""
    g = torch.Generator().manual_seed(0)
    sd = {f"block{i}.weight": torch.randn(64, 32, 3, 3, generator=g) for i in range(4)}
    sd["block0.bias"] = torch.arange(64, dtype=torch.float32)
    torch.save(sd, tmp_path / "stored.pt")
    _rezip_deflated(tmp_path / "stored.pt", tmp_path / "deflated.pt")
    with zipfile.ZipFile(tmp_path / "deflated.pt") as z:
        assert any(i.compress_type == zipfile.ZIP_DEFLATED for i in z.infolist())
    for name in ("stored.pt", "deflated.pt"):
        got, _ = read_state_dict(tmp_path / name)
        assert got.keys() == sd.keys()
        for k in sd:
            assert torch.equal(got[k], sd[k]), (name, k)


# ------------------------------------------------------------------------------ tracebacks as one line


def test_nested_json_and_unknown_tasks_are_one_line(tmp_path, capsys):
    """RecursionError in five JSON readers, and an unknown task in a PNG description (KeyError)."""
    o = tmp_path / "out"
    deep_png = described_png(tmp_path / "deep.png", DEEP)
    _fails(capsys, ["restore", deep_png, *FAST, "-o", o], "nested too deeply")
    _fails(capsys, ["restore", deep_png, *SR2, *FAST, "-o", o], "nested too deeply")
    exec_png = described_png(tmp_path / "exec.png", _desc("exec", {}))
    _fails(capsys, ["restore", exec_png, *FAST, "-o", o], "unknown task 'exec'")
    _fails(capsys, ["restore", exec_png, *SR2, *FAST, "-o", o], "unknown task 'exec'")
    data = _photos(tmp_path / "data", 1)
    man = tmp_path / "data" / "m.jsonl"
    man.write_text('{"id": "a", "path": "img000.png", "params": ' + "[" * 100000 + "]" * 100000 + "}\n")
    _fails(capsys, ["ray-restore", man, "--from-clean", *SR2, *FAST, "-o", o], "nested too deeply")
    profile = tmp_path / "deep.json"
    profile.write_text(DEEP)
    _fails(capsys, ["restore", data, "--from-clean", *SR2, *FAST, "--profile", profile, "-o", o], "nested too deeply")
    _fails(capsys, ["restore", data, "--from-clean", *SR2, "--emulate-cost", profile, "--steps", "3",
                    "--no-progress", "-o", o], "nested too deeply")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "deep.safetensors"), metadata={"deqir_config": DEEP})
    with pytest.raises(DeqirError, match="not valid JSON"):
        read_state_dict(tmp_path / "deep.safetensors")
    # a planted deep line in a results log is skipped like a torn one
    (tmp_path / "r.jsonl").write_text(DEEP + "\n" + json.dumps({"id": "a", "status": "ok"}) + "\n")
    assert list(load_results(tmp_path / "r.jsonl")) == ["a"]
    assert not o.exists()


@pytest.mark.parametrize("kind", ["sparse", "meta"])
def test_sparse_or_meta_y_is_one_line(tmp_path, capsys, kind):
    y = torch.zeros(3, 2048).to_sparse() if kind == "sparse" else torch.empty(3, 2048, device="meta")
    pt = _fake_measurement(tmp_path / "y.pt", y, {"name": "cs_wht", "image_shape": [3, 64, 64],
                                                  "params": {"ratio": 6, "seed": 0}})
    _fails(capsys, ["restore", pt, "--task", "cs_wht", *FAST, "-o", tmp_path / "out"], "dense (strided)")
    _fails(capsys, ["restore", pt, *FAST, "-o", tmp_path / "out"], "dense (strided)")


def test_a_huge_text_mask_is_capped(tmp_path):
    """A 60,000-character text mask in a description: a 2.15 GB canvas unchecked; one line now."""
    png = described_png(tmp_path / "text.png", _desc("inpaint", {"mask": "text", "text": "A" * 60000, "lines": 1}))
    [r] = _run_child([("text mask", ["restore", str(png), *FAST, "-o", str(tmp_path / "out")])], timeout=60)
    _one_line(r, "over the cap of 256")
    assert r["rss_mb"] < 500 and r["seconds"] < 10, r


# ------------------------------------------------------------------------------ special files


def test_profile_and_cost_tables_from_devices_and_pipes(tmp_path):
    """--profile / --emulate-cost / bench --cost-from on /dev/zero (3.2 GB then MemoryError) and a
    FIFO (a hang) unchecked: one line each, at once."""
    data = _photos(tmp_path / "data", 1)
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    o = str(tmp_path / "out")
    base = ["restore", str(data), "--from-clean", *SR2, "--steps", "3", "--no-progress", "-o", o]
    cases = []
    for src in ("/dev/zero", str(fifo)):
        cases += [(f"--profile {src}", base + ["--model", "analytic", "--profile", src]),
                  (f"--emulate-cost {src}", base + ["--emulate-cost", src]),
                  (f"bench --cost-from {src}", ["bench", "--profile", "--cost-from", src])]
    results = _run_child(cases, timeout=120)
    for r in results:
        _one_line(r, "a device" if "/dev/zero" in r["name"] else "a named pipe")
        assert r["seconds"] < 20, r
    assert max(r["rss_mb"] for r in results) < 500, results
    assert not Path(o).exists()


def test_planted_results_log_cannot_hang_or_write_outside(tmp_path):
    """A results.jsonl FIFO in a shared -o hung ray-restore (SIGINT ignored); a symlink made it
    append records to a file outside -o. Both are refused before Ray starts."""
    data = _photos(tmp_path / "data", 2)
    fifo_out, link_out = tmp_path / "fifo_out", tmp_path / "link_out"
    fifo_out.mkdir()
    link_out.mkdir()
    os.mkfifo(fifo_out / "results.jsonl")
    victim = tmp_path / "victim.txt"
    victim.write_text("not yours\n")
    (link_out / "results.jsonl").symlink_to(victim)
    args = ["--from-clean", *SR2, *FAST, "--workers", "1"]
    results = _run_child([("fifo", ["ray-restore", str(data), *args, "-o", str(fifo_out)]),
                          ("symlink", ["ray-restore", str(data), *args, "-o", str(link_out)])], timeout=120)
    _one_line(results[0], "is a named pipe, not a regular file")
    _one_line(results[1], "is a symbolic link")
    assert all(r["seconds"] < 20 for r in results), results           # refused before Ray started
    assert victim.read_text() == "not yours\n"
    # the log itself, opened directly: never through a link, never blocking
    for planted in (fifo_out / "results.jsonl", link_out / "results.jsonl"):
        with pytest.raises(DeqirError, match="named pipe|symbolic link"):
            _ResultsLog(planted)
    assert victim.read_text() == "not yours\n"


# ------------------------------------------------------------------------------ a summary that never lies


def test_an_interrupted_commit_or_a_full_disk_at_the_summary_never_leaves_a_lying_summary(tmp_path, capsys,
                                                                                           monkeypatch):
    """Run A fills the folder; run B (other seed) is stopped inside its commit (after its first
    rename), and, separately, fails to write its summary (a full disk). The red team saw 11 PNGs
    of A + 1 of B under A's summary, and all of B's PNGs with no summary. Now: an interrupted
    commit leaves no summary at all (A's was removed before the first rename), and a summary that
    does not fit fails before anything moved (it is staged with the pictures)."""
    import deqir_dist.dataset.items as items_mod
    data = _photos(tmp_path / "data", 4)
    out = tmp_path / "out"
    run = ["restore", str(data), "--from-clean", *SR2, *FAST, "-o", str(out)]
    assert main(run + ["--seed", "1"]) == 0
    a = _tree(out)
    assert json.loads(a["summary.json"])["seed"] == 1

    def full_disk(path, obj):
        raise DeqirError(f"cannot write {path}: OSError: [Errno 28] No space left on device")
    monkeypatch.setattr(items_mod, "write_json", full_disk)
    _fails(capsys, run + ["--seed", "0"], "No space left")
    assert _tree(out) == a                         # the folder as it was: A's pictures under A's summary
    monkeypatch.undo()

    real, calls = os.replace, []

    def killed_mid_commit(src, dst):
        if Path(src).parent.name.startswith(".deqir-staging-") and Path(dst).parent == out:
            calls.append(dst)                       # the commit's renames (not a picture's own atomic write)
        if len(calls) == 2:
            raise KeyboardInterrupt                 # a signal between two renames
        return real(src, dst)
    monkeypatch.setattr(os, "replace", killed_mid_commit)
    assert main(run + ["--seed", "0"]) == 130
    monkeypatch.undo()
    after = _tree(out)
    assert "summary.json" not in after             # nothing claims what the mixed folder holds
    assert sum(after[k] != a[k] for k in after if k.endswith(".png")) == 1
    assert not [k for k in after if k.startswith(".deqir")]
    assert main(run + ["--seed", "0"]) == 0         # a rerun completes it, its summary last
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 0 and all(Path(r["output"]).exists() for r in summary["images"])


# ------------------------------------------------------------------------------ SIGTERM under Ray


@pytest.mark.slow
def test_sigterm_to_ray_restore_once_ray_is_up_is_the_clean_stop(tmp_path):
    """ray.init installs its own SIGTERM handlers (a C++ stack dump, exit 15); the guard's is put
    back: one line, exit 143, and the folder consistent (a rerun resumes)."""
    data = _photos(tmp_path / "data", 60, size=32)          # 1000 serial steps: ~0.3 s an image, 60 images
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"command": "ray-restore", "restored_total": 0}))   # an earlier run's
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0"}
    job = subprocess.Popen([sys.executable, "-m", "deqir_dist", "ray-restore", str(data), "--from-clean", *SR2,
                            "--model", "analytic", "--solver", "serial", "--steps", "1000", "--no-progress",
                            "--workers", "1", "--cpus-per-worker", "1", "--images-per-batch", "1", "-o", str(out)],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.time() + 150
        while job.poll() is None and time.time() < deadline and not (
                (out / "results.jsonl").exists() and (out / "results.jsonl").read_text().count("\n") >= 2):
            time.sleep(0.1)                         # readiness: Ray is up and two records are written
        assert job.poll() is None, job.stderr.read().decode()[-800:]
        job.send_signal(signal.SIGTERM)
        code = job.wait(timeout=90)
    finally:
        if job.poll() is None:
            job.kill()
            job.wait()
    err = [ln for ln in job.stderr.read().decode().splitlines() if ln.strip()]
    assert code == 143 and err[-1] == "deqir: error: stopped by SIGTERM", (code, err[-10:])
    assert not any("SIGTERM received" in ln for ln in err), err[-10:]
    records = load_results(out / "results.jsonl")
    pngs = sorted(p.stem for p in out.glob("*.png"))
    assert 2 <= len(records) < 60 and sorted(records) == pngs
    assert not (out / LOCK_NAME).exists()
    assert not (out / "summary.json").exists()      # the earlier run's went before the first output: never a lying one
    # the rerun resumes; its summary says what ran it (argv, versions)
    rerun = subprocess.run([sys.executable, "-m", "deqir_dist", "ray-restore", str(data), "--from-clean", *SR2,
                            "--model", "analytic", "--solver", "serial", "--steps", "1000", "--no-progress",
                            "--workers", "1", "--cpus-per-worker", "1", "-o", str(out)],
                           cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-800:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_done"] == len(records) and summary["restored_total"] == 60
    assert summary["argv"][:2] == ["deqir", "ray-restore"] and "torch" in summary["versions"]


# ------------------------------------------------------------------------------ long manifests


def test_long_manifest_checks_report_progress_and_scale(tmp_path, capsys, monkeypatch):
    """A 10^6-line manifest spent 5 minutes in silent checks before Ray: the checks now print a plain
    line every 10 s (here every 0 s), and cost a few microseconds a line more than parsing it."""
    import deqir_dist.dataset.manifest as manifest_mod
    n = 4096
    man = tmp_path / "m.jsonl"
    man.write_text("".join(json.dumps({"id": f"x{i}", "path": f"missing{i}.png"}) + "\n" for i in range(n)))
    monkeypatch.setattr(manifest_mod.Ticker, "EVERY", 0.0)
    t0 = time.perf_counter()
    entries, _ = manifest_mod.read_input(man)
    seconds = time.perf_counter() - t0
    err = capsys.readouterr().err.splitlines()
    assert len(entries) == n
    assert err == [f"deqir: checking manifest m.jsonl, line {k} of {n}" for k in range(1024, n + 1, 1024)]
    assert seconds < 5.0, seconds          # ~0.2 s here; 10^6 lines were 5 minutes with the job's checks


# ================================================================================ part 4: what a user meets


def _gray_photo(path: Path, size: int = 16, seed: int = 0) -> Path:
    from PIL import Image
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(path)
    return path


def test_serial_solver_under_ranks_is_said_in_one_line():
    from deqir_dist.apps.guard import serial_ranks_note
    recs = [{"id": "a", "solver": "picard"}, {"id": "b", "solver": "serial"}]
    note = serial_ranks_note(recs, 2)
    assert note.startswith("deqir: note: b ran the serial solver") and "--solver picard" in note
    assert "\n" not in note
    assert serial_ranks_note(recs, 1) is None and serial_ranks_note([{"solver": "picard"}], 4) is None
    dealt = serial_ranks_note([{"id": "a", "solver": "serial", "dealt_to_rank": 1}], 3)      # dataset.dealt
    assert "dealt over the 3 ranks" in dealt and "\n" not in dealt


@pytest.mark.slow
def test_torchrun_at_the_defaults_says_the_serial_images_are_dealt_over_the_ranks(tmp_path):
    data = _photos(tmp_path / "data", 3)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "launch" / "restore.py"), str(data), "--from-clean", *SR2, "--model", "analytic",
                           "--steps", "8", "--solver", "serial", "--no-progress", "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, env=env, timeout=180, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = [ln for ln in proc.stderr.splitlines() if ln.startswith("deqir: note:")]
    assert notes == ["deqir: note: the serial solver does not shard an image's chain, so the images are dealt over "
                     "the 2 ranks (rank r restores images r, r + 2, ... alone); give --solver picard to split "
                     "each chain over the ranks instead"], proc.stderr[-2000:]          # once, after the first image


def test_unit_range_warning_survives_bicubic_overshoot():
    """y = A(x) of a [0, 1] picture under bicubic x4: a few values below 0 (the old check, min >= 0,
    missed it); the same picture in [-1, 1] is not warned about."""
    import warnings

    from deqir_dist import make_operator
    from deqir_dist.api.conventions import apply_value_range
    x = torch.zeros(1, 3, 64, 64)
    x[..., 10:30, 6:50] = 1
    x[..., 40:43, :] = 1
    op = make_operator("sr_bicubic", (3, 64, 64), scale=4)
    y = op.A(x)
    assert float(y.min()) < -0.05                 # the overshoot
    for data, warned in ((y, True), (2 * y - 1, False)):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            apply_value_range(data, op, None, 0.0)
        assert bool([m for m in w if "[0, 1]" in str(m.message)]) == warned


def test_mask_convention_warning_and_mask_invert(tmp_path, capsys):
    """A mask image that drops 94% of the picture is most likely drawn white = hole (diffusers,
    OpenCV): one warning line naming --mask-invert; with it the mask is inverted (and no warning)."""
    from PIL import Image

    import warnings

    from deqir_dist.dataset.tasks import operator_params
    hole = np.zeros((16, 16), np.uint8)
    hole[4:8, 4:8] = 255                            # white = the hole: 1/16 of the picture
    Image.fromarray(hole).save(tmp_path / "mask.png")
    with pytest.warns(UserWarning, match=r"94% of the image missing.*--mask-invert"):
        kept = operator_params("inpaint", {"mask": str(tmp_path / "mask.png")})["mask"]
    assert float(kept.mean()) == 1 / 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inv = operator_params("inpaint", {"mask": str(tmp_path / "mask.png"), "mask_invert": True})["mask"]
    assert torch.equal(inv, 1 - kept)
    data = _photos(tmp_path / "data", 1)
    args = ["restore", str(data), "--from-clean", "--task", "inpaint", "--mask", str(tmp_path / "mask.png"), *FAST]
    with pytest.warns(UserWarning, match="94%") as w:
        assert main([*args, "-o", str(tmp_path / "a")]) == 0
    assert len([m for m in w if "94%" in str(m.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main([*args, "--mask-invert", "-o", str(tmp_path / "b")]) == 0
    # as the command prints it: one line (tests/test_redteam.py::test_cli_errors_version_progress_and_summary)
    p = subprocess.run([sys.executable, "-m", "deqir_dist", *args, "-o", str(tmp_path / "c")], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 0, p.stderr
    warned = [ln for ln in p.stderr.splitlines() if "warn" in ln]
    assert len(warned) == 1 and warned[0].startswith("deqir: warning: mask ") and "--mask-invert" in warned[0], \
        p.stderr
    _fails(capsys, ["restore", str(data), "--from-clean", *SR2, "--mask-invert", *FAST, "-o", tmp_path / "c"],
           "--mask-invert applies to a mask image")


def test_grayscale_in_grayscale_out(tmp_path, capsys):
    from PIL import Image
    gray = tmp_path / "gray"
    gray.mkdir()
    _gray_photo(gray / "g.png")
    for argv in (["restore", str(gray), "--from-clean", *SR2, *FAST, "-o", str(tmp_path / "a")],
                 ["degrade", str(gray), *SR2, "-o", str(tmp_path / "m")]):
        assert main(argv) == 0, capsys.readouterr().err
    assert main(["restore", str(tmp_path / "m"), *FAST, "-o", str(tmp_path / "b")]) == 0, capsys.readouterr().err
    for out in (tmp_path / "a" / "g.png", tmp_path / "b" / "g.png"):
        with Image.open(out) as im:
            assert im.mode == "L", (out, im.mode)
    colour = _photos(tmp_path / "colour", 1)
    assert main(["restore", str(colour), "--from-clean", *SR2, *FAST, "-o", str(tmp_path / "c")]) == 0
    with Image.open(tmp_path / "c" / "img000.png") as im:
        assert im.mode == "RGB"


def test_from_clean_on_measurements_is_refused_not_a_silent_overwrite(tmp_path, capsys):
    """--from-clean on the PNGs deqir degrade wrote degraded them again and replaced the earlier
    restorations in -o with 4x smaller pictures; now one line, the folder as it was."""
    data = _photos(tmp_path / "data", 2)
    assert main(["degrade", str(data), *SR2, "-o", str(tmp_path / "m")]) == 0
    out = tmp_path / "out"
    assert main(["restore", str(tmp_path / "m"), *FAST, "-o", str(out)]) == 0
    before = _tree(out)
    capsys.readouterr()
    _fails(capsys, ["restore", tmp_path / "m", "--from-clean", *SR2, *FAST, "-o", out],
           "is a measurement deqir degrade wrote")
    assert _tree(out) == before


def test_a_failing_metric_keeps_the_restorations(tmp_path, capsys, monkeypatch):
    """SSIM raising after every image was restored discarded all of them, naming no file."""
    import deqir_dist.dataset.items as items_mod

    def broken(a, b):
        raise RuntimeError("window larger than the image")
    monkeypatch.setattr(items_mod, "ssim", broken)
    data = _photos(tmp_path / "data", 2)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="PSNR/SSIM could not be computed") as w:
        assert main(["restore", str(data), "--from-clean", *SR2, *FAST, "-o", str(out)]) == 0
    warned = [str(m.message) for m in w if "PSNR/SSIM" in str(m.message)]
    assert len(warned) == 2 and warned[0].startswith(f"{data / 'img000.png'}: restored, but")
    summary = json.loads((out / "summary.json").read_text())
    assert [r["metrics_error"] for r in summary["images"]] == ["RuntimeError: window larger than the image"] * 2
    assert sorted(p.name for p in out.glob("*.png")) == ["img000.png", "img001.png"]


def test_one_name_per_operator_parameter(tmp_path):
    """make_operator takes the names restore_file, the CLI and manifests use (kernel_size,
    blur_sigma, mask_fraction, mask_seed, cs_seed); restore_file takes make_operator's with a
    deprecation line; an operator parameter given to restore is reported as one."""
    import deqir_dist as dq
    from deqir_dist.models import load_denoiser
    a = dq.make_operator("deblur_gauss", (3, 16, 16), kernel_size=3, blur_sigma=2.0)
    b = dq.make_operator("deblur_gauss", (3, 16, 16), size=3, sigma=2.0)
    assert a.describe() == b.describe()
    assert dq.make_operator("inpaint", (3, 16, 16), mask="random", mask_fraction=0.3, mask_seed=2).describe() == \
        dq.make_operator("inpaint", (3, 16, 16), mask="random", fraction=0.3, seed=2).describe()
    assert dq.make_operator("cs_wht", (3, 16, 16), cs_seed=3).describe()["params"]["seed"] == 3
    with pytest.raises(DeqirError, match="name the same parameter"):
        dq.make_operator("deblur_gauss", (3, 16, 16), kernel_size=3, size=5)
    photo = _photos(tmp_path / "data", 1) / "img000.png"
    model = load_denoiser("analytic")
    kw = dict(task="deblur_gauss", model=model, from_clean=True, steps=3, solver="serial")
    ref = dq.restore_file(photo, kernel_size=3, **kw)
    with pytest.warns(FutureWarning, match="size= is make_operator's name of kernel_size="):
        old = dq.restore_file(photo, size=3, **kw)
    assert torch.equal(ref.image, old.image)
    y, op = torch.zeros(1, 3, 16, 16), b
    with pytest.raises(DeqirError, match="kernel_size is a parameter of the operator, not of restore"):
        dq.restore(model, y, op, kernel_size=3, steps=3)


def test_restore_result_is_documented_with_a_short_repr_and_diffusers_names():
    import pydoc

    import deqir_dist as dq
    from deqir_dist.models import load_denoiser
    text = pydoc.render_doc(dq.RestoreResult)
    for field_name in ("image", "iterations", "solver", "seconds", "plan", "settings_source", "timings"):
        assert f"``{field_name}``" in text, field_name
    model = load_denoiser("analytic")
    op = dq.make_operator("sr_avgpool", (3, 64, 64), scale=2)
    y = op.A(torch.zeros(1, 3, 64, 64))
    res = dq.restore(model, y, op, num_inference_steps=4, output_type="pt", solver="serial")
    assert res.steps == 4 and res.image.shape == (1, 3, 64, 64)
    r = repr(res)
    assert r.startswith("RestoreResult(image=<1x3x64x64 float32>, solver='serial', steps=4") and len(r) < 200
    with pytest.raises(DeqirError, match=r"result.to_pil\(\)"):
        dq.restore(model, y, op, output_type="pil", steps=4)
    with pytest.raises(DeqirError, match="num_inference_steps is another name for steps"):
        dq.restore(model, y, op, steps=3, num_inference_steps=4)


def test_cli_errors_version_progress_and_summary(tmp_path):
    """argparse's error in one line (was 22 lines of usage), --version, plain progress lines when
    stderr is not a terminal (tqdm wrote hundreds of \\r redraws into logs), argv and versions in
    summary.json."""
    def run(*argv):
        return subprocess.run([sys.executable, "-m", "deqir_dist", *map(str, argv)], capture_output=True, text=True,
                              cwd=ROOT, timeout=120)
    p = run("restore", "x.png", "--task", "nope", "-o", tmp_path / "o")
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("deqir: error: argument --task: invalid choice: 'nope'") and "deqir restore --help" \
        in p.stderr
    p = run("--version")
    assert p.returncode == 0 and p.stdout.startswith("deqir-dist ") and "torch" in p.stdout
    data = _photos(tmp_path / "data", 3)
    out = tmp_path / "out"
    p = run("restore", data, "--from-clean", *SR2, "--model", "analytic", "--steps", "20", "--solver", "picard",
            "-o", out)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr
    assert [ln for ln in p.stderr.splitlines() if ln.startswith("restore: ")][-1].startswith("restore: 3/3 img")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["argv"][:3] == ["deqir", "restore", str(data)]
    assert set(summary["versions"]) >= {"deqir_dist", "torch", "python", "numpy", "pillow"}


def test_messages_name_the_output_not_the_staging_folder_and_ids_have_no_control_characters(tmp_path, capsys,
                                                                                            monkeypatch):
    import deqir_dist.dataset.items as items_mod
    from deqir_dist.dataset.manifest import check_id

    for bad in ("a\nb", "tab\there", "bell\x07"):
        with pytest.raises(DeqirError, match="control characters"):
            check_id(bad)
    data = _photos(tmp_path / "data", 2)
    out = tmp_path / "out"
    real = items_mod.write_image

    def full(path, *a, **k):
        if Path(path).name == "img001.png":
            raise DeqirError(f"cannot write {path}: OSError: [Errno 28] No space left on device")
        return real(path, *a, **k)
    monkeypatch.setattr(items_mod, "write_image", full)
    line = _fails(capsys, ["restore", data, "--from-clean", *SR2, *FAST, "-o", out], "No space left")
    assert f"cannot write {out / 'img001.png'}:" in line and ".deqir-staging" not in line, line


def test_special_files_in_an_input_folder_are_listed_as_skipped(tmp_path):
    """ray-restore records each skipped file in results.jsonl; special files were left out silently."""
    from deqir_dist.dataset.manifest import read_input
    data = _photos(tmp_path / "data", 1)
    os.mkfifo(data / "pipe.png")
    (data / "notes.txt").write_text("x")
    entries, skipped = read_input(data)
    assert [e.id for e in entries] == ["img000"]
    assert [f.name for f in skipped] == ["notes.txt", "pipe.png"]


def test_a_pixel_cap_above_pillows_own_is_honoured(tmp_path):
    """--max-pixels above 178,956,970 met Pillow's DecompressionBombError: the cap the user set rules."""
    from deqir_dist.io import limits
    from deqir_dist.io.pngtext import read_description
    from tests.test_hostile import png_bomb
    bomb = png_bomb(tmp_path / "big.png", 13500, 13500)          # 182 M pixels, ~180 KB; only its header is read
    with pytest.raises(DeqirError, match="over the cap"):
        read_description(bomb)
    with limits.decode_limits(max_pixels=200_000_000):
        assert read_description(bomb) is None
    from PIL import Image
    assert Image.MAX_IMAGE_PIXELS == 89_478_485                 # put back with the cap

"""``deqir ray-restore``: dataset jobs on Ray (one local Ray session for the whole file).

Covers the done criterion (20 images, 2 corrupt: 18 outputs, 2 recorded failures; the rerun
skips the 18), resume by configuration hash, a worker killed mid-job (test-only switch) with
outputs byte-identical to ``deqir restore``, a gloo gang of 2 rank actors, manifests with
per-image parameters and ground truth, and bad input (each fails before anything is written).
"""
import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ray = pytest.importorskip("ray")

from deqir_dist.apps.cli import main as deqir_main  # noqa: E402
from deqir_dist.apps.ray_restore import add_parser, cmd_ray_restore
from deqir_dist.dataset.manifest import check_id, read_input
from deqir_dist.dataset.results import config_hash, load_results
from deqir_dist.errors import DeqirError  # noqa: E402
from deqir_dist.ray.worker import RestoreWorker

FAST = ["--model", "analytic", "--steps", "6", "--no-progress"]
SR2 = ["--task", "sr_avgpool", "--scale", "2"]


def main(argv):
    """``deqir ray-restore ARGV``."""
    return deqir_main(["ray-restore", *argv])


@pytest.fixture(scope="module")
def ray_session():
    """The one Ray instance of this file (ray-restore reuses an initialised Ray for --address local)."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    yield ray
    ray.shutdown()


def _photos(folder: Path, n: int, size: int = 16, corrupt=(), seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        path = folder / f"img{i:02d}.png"
        if i in corrupt:
            path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
            continue
        img = np.stack([np.sin(xx / (2 + i % 5)), np.cos(yy / 3), np.sin((xx + yy) / 4)], -1)
        img = ((img + 1) * 127.5 + rng.normal(0, 4, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(path)
    return folder


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def _pngs(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.png"))}


def _plain_loop(data: Path, out: Path, **kw) -> dict:
    """The fault-free reference: the in-process loop ``deqir restore --from-clean`` runs (SR2, FAST)."""
    from deqir_dist.dataset.items import expand_inputs, load_items, restore_items
    from deqir_dist.models import load_denoiser
    items = load_items(expand_inputs([str(data)]), "sr_avgpool", {"scale": 2}, True, seed=0)
    restore_items(load_denoiser("analytic"), items, str(out), {"steps": 6, **kw}, seed=0, progress=False)
    return _pngs(out)


# ------------------------------------------------------------------------------------ whole jobs


def test_folder_job_records_failures_then_resumes(ray_session, tmp_path, capsys):
    data = _photos(tmp_path / "data", 20, corrupt=(3, 11))
    (data / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    args = [str(data), "-o", str(out), "--address", "local", "--from-clean", *SR2, *FAST,
            "--workers", "2", "--images-per-batch", "3"]
    assert main(args) == 1                                  # some images failed
    recs = {r["id"]: r for r in _records(out)}
    assert len(_pngs(out)) == 18 and not (out / "img03.png").exists()
    failed = sorted(i for i, r in recs.items() if r["status"] == "failed")
    assert failed == ["img03", "img11"] and "img03.png" in recs["img03"]["error"]
    assert recs["notes.txt"]["status"] == "skipped"
    ok = recs["img00"]
    assert ok["status"] == "ok" and ok["output"] == str(out / "img00.png")
    assert {"psnr", "ssim", "iterations", "seconds", "config"} <= set(ok)
    s = _summary(out)
    assert (s["ok"], s["failed"], s["skipped"], s["written"]) == (18, 2, 1, 18)
    assert s["images_per_second"] > 0 and "mean_psnr" in s
    assert not [p for p in out.iterdir() if p.name.startswith(".")]        # no temp files left
    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    capsys.readouterr()

    # the same command again: the 18 are skipped (untouched), only the failures are retried
    assert main(args) == 1
    s = _summary(out)
    assert (s["ok"], s["failed"], s["skipped_done"], s["written"]) == (0, 2, 18, 0)
    assert s["restored_total"] == 18 and s["images"] == 20 and s["images_per_second"] == 0.0   # none restored now
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes
    assert len(_records(out)) == 21                         # compacted: one line per id
    printed = capsys.readouterr().out
    assert "this run: 0 ok, 2 failed" in printed and "18 done before" in printed
    assert f"18 of 20 images restored in {out}" in printed


def test_worker_death_is_replaced_and_outputs_identical(ray_session, tmp_path, monkeypatch, capsys):
    data = _photos(tmp_path / "data", 8, seed=1)
    expected = _plain_loop(data, tmp_path / "ref")          # fault-free, in one process
    marker = tmp_path / "exited.marker"
    monkeypatch.setenv("DEQIR_TEST_WORKER_EXIT_AFTER", "3")
    monkeypatch.setenv("DEQIR_TEST_WORKER_EXIT_MARKER", str(marker))
    out = tmp_path / "out"
    code = main([str(data), "-o", str(out), "--from-clean", *SR2, *FAST, "--workers", "2",
                 "--images-per-batch", "2"])
    assert code == 0, capsys.readouterr().err
    assert marker.exists()                                  # a worker really died, once
    s = _summary(out)
    assert s["worker_restarts"] == 1 and s["retried_batches"] >= 1
    assert (s["ok"], s["failed"], s["written"]) == (8, 0, 8)     # each image written exactly once
    ids = [r["id"] for r in _records(out)]
    assert sorted(ids) == [f"img{i:02d}" for i in range(8)]
    assert any(r["attempt"] == 1 for r in _records(out))
    assert len(expected) == 8 and _pngs(out) == expected   # byte-identical to the fault-free run


def test_gang_of_two_gloo_ranks_survives_a_dead_rank(ray_session, tmp_path, monkeypatch):
    data = _photos(tmp_path / "data", 4, seed=2)
    ref = tmp_path / "ref"
    _plain_loop(data, ref, solver="picard")
    monkeypatch.setenv("DEQIR_TEST_WORKER_EXIT_AFTER", "2")   # one rank dies; its peer hangs in a collective
    monkeypatch.setenv("DEQIR_TEST_WORKER_EXIT_MARKER", str(tmp_path / "exited.marker"))
    out = tmp_path / "out"
    assert main([str(data), "-o", str(out), "--from-clean", *SR2, *FAST, "--gpus-per-worker", "2",
                 "--workers", "1", "--device", "cpu", "--solver", "picard"]) == 0
    s = _summary(out)
    assert s["ok"] == 4 and s["ranks_per_worker"] == 2 and s["workers"] == 1
    assert s["worker_restarts"] == 1                        # the whole gang was replaced
    assert {r["ranks"] for r in _records(out)} == {2}      # restored by the 2-rank process group
    for name in _pngs(ref):                                 # sharded chain == single process
        a = np.asarray(Image.open(out / name)).astype(int)
        b = np.asarray(Image.open(ref / name)).astype(int)
        assert np.abs(a - b).max() <= 1, name


def test_manifest_params_ground_truth_and_config_change(ray_session, tmp_path):
    clean = _photos(tmp_path / "clean", 3, seed=3)
    meas = tmp_path / "meas"
    for scale, names in ((2, ["img00", "img02"]), (4, ["img01"])):
        for n in names:
            assert deqir_main(["degrade", str(clean / f"{n}.png"), "--task", "sr_avgpool", "--scale",
                               str(scale), "-o", str(meas)]) == 0
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "small_gt.png")
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("\n".join(json.dumps(o) for o in [
        {"id": "a", "path": "meas/img00.png", "gt": "clean/img00.png"},
        {"id": "b", "path": "meas/img01.png", "gt": "clean/img01.png", "params": {"scale": 4}},
        {"id": "c", "path": "meas/img02.png", "gt": "small_gt.png"},
        {"id": "d", "path": "meas/missing.png"},
    ]) + "\n")
    out = tmp_path / "out"
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))      # the subcommand as cli.py registers it
    args = parser.parse_args(["ray-restore", str(manifest), "-o", str(out), *SR2, *FAST,
                              "--images-per-batch", "8", "--workers", "1"])
    assert cmd_ray_restore(args) == 1
    recs = load_results(out / "results.jsonl")
    assert recs["a"]["status"] == recs["b"]["status"] == "ok"
    assert recs["a"]["psnr"] > 10 and "ssim" in recs["b"]
    assert np.asarray(Image.open(out / "b.png")).shape == (16, 16, 3)     # its own scale
    assert recs["c"]["status"] == "failed" and "ground truth" in recs["c"]["error"]
    assert recs["d"]["status"] == "failed" and "cannot read" in recs["d"]["error"]
    assert recs["a"]["config"] != recs["b"]["config"]       # per-image parameters are hashed

    # a flag that contradicts a measurement's description: refused before Ray starts, nothing written
    bad = parser.parse_args(["ray-restore", str(meas), "-o", str(tmp_path / "never"), "--task", "sr_avgpool",
                             "--scale", "3", *FAST, "--workers", "1"])
    with pytest.raises(DeqirError, match="degraded with --scale 2 .*the flags give --scale 3"):
        cmd_ray_restore(bad)
    assert not (tmp_path / "never").exists()

    # a changed configuration (seed) redoes the done ones
    args = parser.parse_args(["ray-restore", str(manifest), "-o", str(out), *SR2, *FAST, "--seed", "1",
                              "--workers", "1"])
    assert cmd_ray_restore(args) == 1
    s = _summary(out)
    assert (s["ok"], s["failed"], s["skipped_done"]) == (2, 2, 0)


# ------------------------------------------------------------------------------------ bad input


def _fails(capsys, args, match):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 2 and match in err, err


def test_bad_inputs_fail_before_writing(tmp_path, capsys):
    out = tmp_path / "never"
    base = ["-o", out, *SR2, *FAST]
    _fails(capsys, [tmp_path / "missing", *base], "input not found")
    (tmp_path / "empty").mkdir()
    _fails(capsys, [tmp_path / "empty", *base], "no images")
    data = _photos(tmp_path / "data", 2)
    _fails(capsys, [data, "-o", data / "out", *SR2, *FAST], "inside the input folder")
    _fails(capsys, [data, "-o", data, *SR2, *FAST], "inside the input folder")
    (tmp_path / "afile").write_text("x")
    _fails(capsys, [data, "-o", tmp_path / "afile" / "out", *SR2, *FAST], "cannot create directory")
    m = tmp_path / "m.jsonl"
    for lines, match in [
        ([{"id": "a", "path": "data/img00.png"}, {"id": "a", "path": "data/img01.png"}], "duplicate id 'a'"),
        ([{"id": "../evil", "path": "data/img00.png"}], "not a safe file name"),
        ([{"id": "sub/x", "path": "data/img00.png"}], "not a safe file name"),
        ([{"id": "..", "path": "data/img00.png"}], "not a safe file name"),
        ([{"path": "data/img00.png", "params": {"bogus": 1}}], "unknown parameter"),
        ([], "lists no images"),
    ]:
        m.write_text("".join(json.dumps(o) + "\n" for o in lines))
        _fails(capsys, [m, *base], match)
    m.write_text("{not json\n")
    _fails(capsys, [m, *base], "not valid JSON")
    m.write_text(json.dumps({"id": "img00", "path": "data/img00.png"}) + "\n")
    _fails(capsys, [m, "-o", data, *SR2, *FAST], "would overwrite an input")
    _fails(capsys, [data, *base, "--gpus-per-worker", "2", "--solver", "serial"], "gangs")
    _fails(capsys, [data, *base, "--profile", tmp_path / "missing.json"], "cannot read cost profile")   # auto's
    assert not out.exists()


def test_ids_and_folder_listing(tmp_path):
    for good in ("img_01", "a.b", "photo 3"):
        assert check_id(good) == good
    for bad in ("", "a/b", "a\\b", "..", "x..y", ".hidden", "a\0b"):
        with pytest.raises(DeqirError):
            check_id(bad)
    data = _photos(tmp_path / "d", 2)
    (data / "readme.md").write_text("x")
    (data / ".DS_Store").write_text("x")
    entries, skipped = read_input(data)
    assert [e.id for e in entries] == ["img00", "img01"] and [p.name for p in skipped] == ["readme.md"]


def test_config_hash_covers_what_changes_the_output():
    base = {"model": "analytic", "task": "inpaint", "op_params": {"mask": torch.ones(4, 4)},
            "restore": {"steps": 6}, "seed": 0}
    h = config_hash(base)
    assert h == config_hash(dict(base))
    assert h != config_hash({**base, "seed": 1})
    assert h != config_hash({**base, "op_params": {"mask": torch.zeros(4, 4)}})
    assert h != config_hash({**base, "restore": {"steps": 7}})


def test_model_identity_covers_the_weights_and_the_cards_settings(tmp_path, monkeypatch):
    """Retrained built-in weights, or a card that recommends other settings, change every image's
    hash, so a resumed job restores again instead of keeping the old model's images."""
    from deqir_dist.dataset import results
    ident = results._model_identity("builtin", None)
    assert ident["weights_sha256"] == hashlib.sha256(results.BUILTIN_WEIGHTS.read_bytes()).hexdigest()
    assert ident["sampler"]["etw"] == 0.8 and set(ident["sampler"]) <= {"steps", "etw", "nw", "clip_x0"}
    fake = tmp_path / "builtin.safetensors"
    fake.write_bytes(b"other weights")
    monkeypatch.setattr(results, "BUILTIN_WEIGHTS", fake)
    assert results._model_identity("builtin", None)["weights_sha256"] != ident["weights_sha256"]
    monkeypatch.setattr(results, "builtin_sampler_card", lambda: {"steps": 25, "etw": 0.5, "source": "x"})
    assert results._model_identity("builtin", None)["sampler"] == {"steps": 25, "etw": 0.5}
    assert results._model_identity("adm-256-uncond", None)["sampler"]["etw"] == 0.1
    assert "sampler" not in results._model_identity("analytic", None)


def test_worker_records_corrupt_nan_and_wrong_size_in_process(tmp_path):
    spec = {"model": "analytic", "device": "cpu", "threads": 1, "task": "sr_avgpool",
            "restore": {"steps": 4, "solver": "picard"}, "seed": 0, "from_clean": True, "bits": 8,
            "batch": True}
    w = RestoreWorker(spec)
    good = _photos(tmp_path / "p", 1)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "odd.png")

    def item(name, data, **kw):
        return {"id": name, "source": f"/src/{name}.png", "suffix": ".png", "data": data, "gt_data": None,
                "gt_source": None, "gt_suffix": "", "op_params": {"scale": 4}, "sigma_y": 0.0, "config": "h",
                **kw}
    recs = w.restore_batch([item("ok", (good / "img00.png").read_bytes()),
                            item("odd", (tmp_path / "odd.png").read_bytes()),
                            item("junk", b"garbage")])
    assert [r["status"] for r in recs] == ["ok", "failed", "failed"]
    assert recs[0]["png"].startswith(b"\x89PNG") and recs[0]["iterations"] >= 1
    assert "/src/junk.png" in recs[2]["error"]              # names the real input, not a temp file
    # a NaN measurement (.pt, as deqir degrade writes for cs_wht)
    from deqir_dist.io.measurements import save_measurement
    from deqir_dist.physics.registry import make_operator
    op = make_operator("cs_wht", image_shape=(3, 8, 8))
    save_measurement(tmp_path / "nan.pt", torch.full(op.measurement_shape, float("nan")), op)
    w2 = RestoreWorker({**spec, "task": "cs_wht", "from_clean": False})
    rec = w2.restore_batch([item("nan", (tmp_path / "nan.pt").read_bytes(), suffix=".pt", op_params={})])[0]
    assert rec["status"] == "failed" and "NaN" in rec["error"]


# ------------------------------------------------------------------------------------ failing early


def _closed_port() -> tuple:
    """A bound, never-listening socket: connecting to its port is refused."""
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def _cli(args, timeout):
    """``deqir ray-restore ...`` in a fresh process (Ray not imported yet, as from the shell)."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    return subprocess.run([sys.executable, "-m", "deqir_dist", "ray-restore", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_unreachable_address_fails_at_once_and_writes_nothing(tmp_path):
    import time
    data = _photos(tmp_path / "data", 1)
    sock, port = _closed_port()
    with sock:
        t0 = time.perf_counter()
        r = _cli([data, "-o", tmp_path / "out", "--address", f"127.0.0.1:{port}", *SR2, *FAST], timeout=60)
        took = time.perf_counter() - t0
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert lines[-1].startswith("deqir: error: cannot reach Ray") and f"127.0.0.1:{port}" in lines[-1]
    assert "Traceback" not in r.stderr and took < 30
    assert not (tmp_path / "out").exists()


def test_silent_address_is_bounded_by_connect_timeout(tmp_path):
    """A port that accepts TCP but never speaks: ray.init would retry for minutes without a bound."""
    import socket
    import time
    data = _photos(tmp_path / "data", 1)
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(64)
        port = srv.getsockname()[1]
        t0 = time.perf_counter()
        r = _cli([data, "-o", tmp_path / "out", "--address", f"127.0.0.1:{port}", "--connect-timeout", "2",
                  *SR2, *FAST], timeout=60)
        took = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    last = [ln for ln in r.stderr.splitlines() if ln.strip()][-1]
    assert last.startswith("deqir: error: cannot start or join Ray") and f"127.0.0.1:{port}" in last
    assert took < 30 and not (tmp_path / "out").exists()


def test_bad_device_model_or_checkpoint_fail_before_ray_and_write_nothing(tmp_path, capsys):
    data = _photos(tmp_path / "data", 1)
    out = tmp_path / "out"
    base = [data, "-o", out, *SR2, "--steps", "4", "--no-progress"]
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    from safetensors.torch import save_file
    save_file({"conv_in.weight": torch.zeros(2, 3, 3, 3)}, str(tmp_path / "odd.safetensors"))
    cases = [
        (["--model", "analytic", "--device", "nosuch"], "--device must be cpu or cuda"),
        (["--model", "analytic", "--device", "cuda"] if not torch.cuda.is_available() else
         ["--model", "analytic", "--device", "mps"], "--device"),
        (["--model", "nosuch"], "unknown model 'nosuch'"),
        (["--checkpoint", tmp_path / "missing.pt"], "checkpoint file not found"),
        (["--checkpoint", tmp_path / "junk.pt"], "junk.pt"),
        (["--checkpoint", tmp_path / "junk.safetensors"], "corrupt safetensors"),
        (["--model", "sdedit-celeba-hq", "--checkpoint", tmp_path / "odd.safetensors"], "unrecognised checkpoint"),
        (["--model", "analytic", "--connect-timeout", "0"], "--connect-timeout must be positive"),
        (["--model", "adm-256-uncond"], "needs --checkpoint"),
        (["--model", "analytic", "--solver", "picard", "--profile", tmp_path / "p.json"], "--solver auto"),
    ]
    for extra, match in cases:
        _fails(capsys, [*base, *extra], match)
        assert not out.exists(), extra


def test_too_many_workers_leaves_no_output(ray_session, tmp_path, capsys):
    data = _photos(tmp_path / "data", 2)
    out = tmp_path / "sub" / "out"
    _fails(capsys, [data, "-o", out, *SR2, *FAST, "--workers", "5"], "need more than")
    assert not (tmp_path / "sub").exists()


def test_failure_after_output_was_created_removes_it(tmp_path, monkeypatch, capsys):
    """Nothing restored: the run removes what it created, and only that."""
    from deqir_dist.ray import job as rp

    class Pool:
        restarts = retried = 0

        def run(self, batches, on_record):
            assert (out / "results.jsonl").is_file()             # the output exists by now
            raise DeqirError("no worker left; rerun the same command to resume")

    class Session:
        startup, batches, pool = 0.0, [], Pool()

        def close(self):
            pass
    monkeypatch.setattr(rp.RayRestoreJob, "_start", lambda self, todo: Session())
    data = _photos(tmp_path / "data", 2)
    out = tmp_path / "new" / "out"
    _fails(capsys, [data, "-o", out, *SR2, *FAST], "no worker left")
    assert not (tmp_path / "new").exists()
    out = tmp_path / "old"                                       # an earlier run's files stay
    out.mkdir()
    (out / "results.jsonl").write_text('{"id": "x", "status": "ok"}\n')
    _fails(capsys, [data, "-o", out, *SR2, *FAST], "no worker left")
    assert sorted(p.name for p in out.iterdir()) == ["results.jsonl"]


def test_small_job_gives_every_worker_a_batch_and_a_full_summary(ray_session, tmp_path):
    """6 images, 2 workers, --images-per-batch 4: batches of ceil(6 / 2) = 3, one per worker; the
    default model (no --model) is named in the summary, and no summary field is null. The inputs are
    deqir degrade's PNGs: their task and operator come from the files (no --task)."""
    data = _photos(tmp_path / "data", 6)
    assert deqir_main(["degrade", str(data), *SR2, "-o", str(tmp_path / "meas")]) == 0
    out = tmp_path / "out"
    assert main([str(tmp_path / "meas"), "-o", str(out), "--steps", "3", "--no-progress",
                 "--workers", "2", "--images-per-batch", "4"]) == 0
    recs = [r for r in _records(out) if r["status"] == "ok"]
    per_worker = {w: sum(r["worker"] == w for r in recs) for w in {r["worker"] for r in recs}}
    assert sorted(per_worker.values()) == [3, 3]
    s = _summary(out)
    assert s["model"] == "builtin" and s["images_per_batch"] == 3 and s["workers"] == 2
    assert s["task"] == "sr_avgpool"
    assert [k for k, v in s.items() if v is None] == []
    # no --solver, no --profile: auto, planned once (one worker timed the model) and followed by both
    assert s["solver"] == "auto" and s["auto"]["chosen"] == "serial" and s["auto"]["procs"] == 1
    assert s["auto"]["profile"] in ("measured", "cache") and s["auto"]["c_ms"]
    assert s["solvers"] == {"serial": 6} and [p["images"] for p in s["plans"]] == [6]
    assert {r["plan"]["profile"] for r in recs} == {"profile (dict)"}       # the driver's table, not their own
    assert {r["plan"]["reason"] for r in recs} == {s["auto"]["reason"]}


def test_gang_with_auto_that_plans_serial_is_refused_before_writing(ray_session, tmp_path, capsys):
    """Gangs shard the chain; when auto's one plan is serial (here: N = 6, K = N), each rank would
    run the whole chain: refused in one line, and nothing is written."""
    data = _photos(tmp_path / "data", 2)
    out = tmp_path / "out"
    _fails(capsys, [data, "-o", out, "--from-clean", *SR2, *FAST, "--gpus-per-worker", "2", "--workers", "1",
                    "--device", "cpu"], "--solver auto chose serial for gangs of 2 ranks")
    assert not out.exists()

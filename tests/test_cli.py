"""The deqir command line end to end: outputs, summaries, and one-line errors with nothing written."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deqir_dist.apps.cli import main
from deqir_dist.io.images import read_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def photos(tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:32, 0:32]
    for i in range(2):
        img = np.stack([np.sin(xx / (3 + i)), np.cos(yy / 4), np.sin((xx + yy) / 6)], -1)
        img = ((img + 1) * 127.5 + rng.normal(0, 3, img.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"img{i}.png")
    return d


def _run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_degrade_then_restore_then_eval(photos, tmp_path, capsys):
    meas = tmp_path / "meas"
    code, out, _ = _run(["degrade", photos, "--task", "sr_bicubic", "--scale", "2", "-o", meas], capsys)
    assert code == 0 and sorted(p.name for p in meas.iterdir()) == ["img0.png", "img1.png"]
    assert read_image(meas / "img0.png").shape == (3, 16, 16)
    out_dir = tmp_path / "restored"
    code, out, _ = _run(["restore", meas, "--task", "sr_bicubic", "--scale", "2", "-o", out_dir,
                         "--steps", "10", "--no-progress", "--device", "cpu"], capsys)
    assert code == 0, out
    summary = json.loads((out_dir / "summary.json").read_text())
    # no --solver: auto, which on a CPU runs serial, and the summary says both
    assert summary["summary"]["images"] == 2 and summary["solver"] == "auto"
    assert summary["summary"]["solvers"] == {"serial": 2}
    assert [r["solver"] for r in summary["images"]] == ["serial", "serial"]
    assert [r["plan"]["chosen"] for r in summary["images"]] == ["serial", "serial"]
    assert [p["chosen"] for p in summary["summary"]["plans"]] == ["serial"]
    assert read_image(out_dir / "img1.png").shape == (3, 32, 32)
    code, out, _ = _run(["eval", out_dir, photos, "--json", tmp_path / "ev.json"], capsys)
    assert code == 0 and "mean" in out
    assert len(json.loads((tmp_path / "ev.json").read_text())["images"]) == 2


@pytest.mark.parametrize("task,extra", [("inpaint", ["--mask", "random"]), ("colorize", ["--clip-x0"]),
                                        ("cs_wht", ["--ratio", "4"]), ("deblur_aniso", [])])
def test_restore_from_clean_reports_metrics(photos, tmp_path, capsys, task, extra):
    out_dir = tmp_path / "o"
    code, out, err = _run(["restore", photos / "img0.png", "--from-clean", "--task", task, *extra,
                           "-o", out_dir, "--steps", "8", "--solver", "picard", "--no-progress"], capsys)
    assert code == 0, err
    rec = json.loads((out_dir / "summary.json").read_text())["images"][0]
    assert {"psnr", "ssim", "iterations"} <= set(rec)


def test_cs_measurements_round_trip_as_pt(photos, tmp_path, capsys):
    meas = tmp_path / "m"
    assert _run(["degrade", photos / "img0.png", "--task", "cs_wht", "-o", meas], capsys)[0] == 0
    assert (meas / "img0.pt").exists()
    code, _, err = _run(["restore", meas, "--task", "cs_wht", "-o", tmp_path / "r", "--steps", "5",
                         "--no-progress"], capsys)
    assert code == 0, err
    code, _, err = _run(["restore", meas, "--task", "inpaint", "-o", tmp_path / "r2", "--steps", "5"], capsys)
    assert code == 2 and "cs_wht" in err
    code, _, err = _run(["restore", meas, "-o", tmp_path / "r3", "--steps", "5", "--no-progress"], capsys)   # no --task
    assert code == 0, err
    assert json.loads((tmp_path / "r3" / "summary.json").read_text())["task"] == "cs_wht"
    (meas / "junk.pt").write_bytes(b"not a torch file")
    code, _, err = _run(["restore", meas / "junk.pt", "--task", "cs_wht", "-o", tmp_path / "r4"], capsys)
    assert code == 2 and "junk.pt: not a measurement deqir degrade wrote" in err


def _bad(capsys, args, tmp_path, match):
    out_dir = tmp_path / "never"
    code, _, err = _run([*args, "-o", out_dir], capsys)
    assert code == 2
    assert err.startswith("deqir: error:") and err.count("\n") == 1 and match in err, err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_bad_inputs_fail_cleanly(photos, tmp_path, capsys):
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes((photos / "img0.png").read_bytes()[:100])
    odd = tmp_path / "odd.png"
    Image.fromarray(np.zeros((30, 31, 3), np.uint8)).save(odd)
    restore = ["restore", "--from-clean", "--steps", "5"]
    _bad(capsys, [*restore, trunc, "--task", "denoise"], tmp_path, "trunc.png")
    _bad(capsys, [*restore, odd, "--task", "sr_avgpool", "--scale", "4"], tmp_path, "divisible")
    _bad(capsys, [*restore, photos, "--task", "sr_avgpool", "--steps", "2000"], tmp_path, "steps")
    _bad(capsys, [*restore, tmp_path / "missing.png", "--task", "colorize"], tmp_path, "not found")
    _bad(capsys, [*restore, odd, "--task", "cs_wht"], tmp_path, "power of two")
    _bad(capsys, [*restore, photos, "--task", "inpaint", "--scale", "2"], tmp_path, "scale")
    _bad(capsys, [*restore, photos, "--task", "cs_wht", "--mask-seed", "3"], tmp_path, "--mask-seed does not apply")
    _bad(capsys, [*restore, photos, "--task", "inpaint", "--model", "nope"], tmp_path, "unknown model")
    _bad(capsys, ["restore", photos / "img0.png", "--task", "sr_avgpool", "--max-iter", "0"], tmp_path, "max_iter")
    _bad(capsys, ["restore", photos / "img0.png", "--task", "sr_avgpool", "--etw", "nan"], tmp_path, "etw")
    _bad(capsys, ["restore", photos / "img0.png", "--task", "sr_avgpool", "--window", "4", "--solver", "anderson"],
         tmp_path, "window")


def test_conflicting_or_untrained_settings_fail_before_work(photos, tmp_path, capsys):
    one = ["restore", photos / "img0.png", "--from-clean", "--task", "inpaint", "--steps", "5"]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.png").write_bytes((photos / "img0.png").read_bytes())
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(mixed / "b.png")
    # issue 16: a size that is not a multiple of 4 is padded and cropped back, no longer refused
    assert _run(["restore", mixed, "--from-clean", "--task", "inpaint", "--steps", "2", "-o", tmp_path / "mixed-out"],
                capsys)[0] == 0
    _bad(capsys, [*one, "--model", "adm-256-uncond"], tmp_path, "--checkpoint")
    _bad(capsys, [*one, "--device", "nosuch"], tmp_path, "unknown device")
    _bad(capsys, [*one, "--solver", "picard", "--profile", tmp_path / "p.json"], tmp_path, "--solver auto")
    _bad(capsys, [*one, "--solver", "auto", "--profile", tmp_path / "missing.json"], tmp_path, "cost profile")
    _bad(capsys, [*one, "--solver", "serial", "--window", "2"], tmp_path, "window")
    _bad(capsys, [*one, "--warm-start", "9"], tmp_path, "warm_start")
    _bad(capsys, [*one, "--threads", "0"], tmp_path, "threads")
    _bad(capsys, [*one, "--optimize-noise", f"oracle:{photos}", "--opt-iters", "0"], tmp_path, "--opt-iters")
    (tmp_path / "jdir").mkdir()
    _bad(capsys, [*one, "--json", tmp_path / "jdir"], tmp_path, "folder")


def test_outputs_never_overwrite_inputs(photos, tmp_path, capsys):
    before = {p.name: p.read_bytes() for p in photos.iterdir()}
    for args in (["restore", photos, "--from-clean", "--task", "inpaint", "--steps", "5", "-o", photos],
                 ["degrade", photos, "--task", "inpaint", "-o", photos]):
        code, _, err = _run(args, capsys)
        assert code == 2 and "would overwrite an input" in err
    assert {p.name: p.read_bytes() for p in photos.iterdir()} == before


def test_pt_measurement_parameters_must_match_the_flags(photos, tmp_path, capsys):
    meas = tmp_path / "m"
    assert _run(["degrade", photos / "img0.png", "--task", "cs_wht", "--cs-seed", "7", "-o", meas], capsys)[0] == 0
    _bad(capsys, ["restore", meas, "--task", "cs_wht", "--steps", "5"], tmp_path, "'seed': 7")
    code, _, err = _run(["restore", meas, "--task", "cs_wht", "--cs-seed", "7", "--steps", "5", "-o", tmp_path / "r",
                         "--no-progress"], capsys)
    assert code == 0, err


def test_bench_flag_checks(tmp_path, capsys):
    for args, match in ((["--graph"], "--profile"), (["--images", "0"], "positive"), (["--size", "-4"], "positive")):
        code, _, err = _run(["bench", *args], capsys)
        assert code == 2 and match in err and err.count("\n") == 1, err


def test_unwritable_output_fails_before_work(photos, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _run(["restore", photos, "--from-clean", "--task", "denoise", "-o", blocker / "sub"], capsys)
    assert code == 2 and "deqir: error:" in err


def test_bench_profile_models_a_given_cost_table(tmp_path, capsys):
    table = tmp_path / "c.json"
    table.write_text(json.dumps({"model": "m", "graph": True, "source": "a test", "c_ms": {"1": 1.0, "100": 1.1}}))
    code, out, _ = _run(["bench", "--profile", "--cost-from", table, "--steps", "100",
                         "--json", tmp_path / "p.json"], capsys)
    assert code == 0 and "a test" in out
    rows = json.loads((tmp_path / "p.json").read_text())["model_rows"]
    assert rows and all(r["auto"] == "picard" for r in rows)                 # flat c(b): parallel wins
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    code, _, err = _run(["bench", "--profile", "--cost-from", bad], capsys)
    assert code == 2 and "profile" in err


def test_bench_prints_and_writes_json(tmp_path, capsys):
    code, out, _ = _run(["bench", "--steps", "10", "--size", "16", "--images", "2", "--windows", "0", "0.5",
                         "--json", tmp_path / "b.json"], capsys)
    assert code == 0 and "anderson" in out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert [r["solver"] for r in rows] == ["serial", "picard", "anderson", "picard plain", "picard W=5"]
    assert rows[0]["psnr_vs_serial"] is None          # serial against itself: inf, written as null (strict JSON)
    assert all(r["psnr_vs_serial"] >= 40 for r in rows[1:])
    plain, frozen = rows[3], rows[1]
    assert plain["rows"] == plain["K_mean"] * 10 and frozen["rows"] < plain["rows"]


def test_torchrun_launcher_matches_single_process(photos, tmp_path):
    """torchrun --nproc_per_node=3 launch/restore.py == deqir restore (same flags)."""
    flags = [str(photos), "--from-clean", "--task", "sr_avgpool", "--scale", "2", "--steps", "12",
             "--no-progress"]
    assert main(["restore", *flags, "-o", str(tmp_path / "one")]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                           str(ROOT / "launch" / "restore.py"), *flags, "-o", str(tmp_path / "three")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("mean_iterations") == 1          # only rank 0 prints the summary
    for name in ("img0.png", "img1.png"):
        a, b = read_image(tmp_path / "one" / name), read_image(tmp_path / "three" / name)
        assert (a - b).abs().max() <= 1 / 255 * 2 + 1e-6
    summary = json.loads((tmp_path / "three" / "summary.json").read_text())
    assert summary["world_size"] == 3


def test_optimize_noise_from_the_cli(photos, tmp_path, capsys):
    base = ["restore", photos / "img0.png", "--from-clean", "--task", "sr_avgpool", "--scale", "2",
            "--steps", "6", "--opt-iters", "2", "--no-progress"]
    code, out, err = _run([*base, "--sigma-y", "0.1", "--optimize-noise", "consistency", "-o", tmp_path / "c"], capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert rec["oracle"] is False and rec["images"][0]["consistency_after"] <= rec["images"][0]["consistency_before"]
    code, out, err = _run([*base, "--optimize-noise", f"oracle:{photos}", "-o", tmp_path / "o"], capsys)
    assert code == 0, err
    assert "ORACLE" in out and json.loads((tmp_path / "o" / "summary.json").read_text())["oracle"] is True
    # --clip-x0 clips the chain it differentiates (optimize_noise takes restore's settings)
    code, out, err = _run([*base, "--clip-x0", "--optimize-noise", f"oracle:{photos}", "-o", tmp_path / "k"],
                          capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "k" / "summary.json").read_text())["sampler"]["settings"]["clip_x0"] is True
    _bad(capsys, [*base, "--optimize-noise", "consistency"], tmp_path, "sigma-y")
    _bad(capsys, [*base, "--optimize-noise", "oracle"], tmp_path, "PATH")
    _bad(capsys, [*base, "--optimize-noise", "reference:/nonexistent.png"], tmp_path, "not found")

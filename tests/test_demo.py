"""``deqir demo`` end to end at a tiny size, and the held-out bench images."""
import json

import pytest
import torch
from PIL import Image

from deqir_dist.apps.cli import main
from deqir_dist.apps.demo import format_demo, run_demo
from deqir_dist.dataset.tasks import DEMO_TASKS
from deqir_dist.apps.demo_inversion import INVERSION_COLUMNS, grid_name
from deqir_dist.errors import DeqirError
from deqir_dist.models.builtin import builtin_bench_images


def test_demo_end_to_end_tiny(tmp_path):
    out = tmp_path / "demo"
    res = run_demo(out_dir=out, size=16, steps=3, samples=2, progress=False)
    assert [r["task"] for r in res["table"]] == list(DEMO_TASKS)
    for task in DEMO_TASKS:
        grid = Image.open(out / f"grid_{task}.png")
        assert grid.width > 5 * 16 and grid.height > 2 * 16
        for name in res["images"]:
            for col in ("degraded", "baseline", "serial", "parallel", "truth", "serial_mmse2"):
                assert (out / "images" / task / f"{name}_{col}.png").is_file()
        t = res["tasks"][task]
        assert t["convergence"] and all(1 <= r["K"] <= 3 for r in t["per_image"])
        assert t["baseline"] in t["all_baselines_psnr"]
    assert Image.open(out / "convergence.png").size[0] > 500
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["table"] == json.loads(json.dumps(res["table"]))
    row = res["table"][0]
    for key in ("psnr_base", "ssim_base", "psnr_serial", "psnr_par", "psnr_mmse", "K", "par_vs_serial"):
        assert key in row
    # the parallel result is the serial one up to the stopping tolerance
    assert min(r["par_vs_serial"] for r in res["table"]) > 30
    text = format_demo(res)
    assert "inpaint_box" in text and "mmse" in text
    # whole photographs, at their own aspect ratio (16 x 24: not square), every task
    whole = saved["whole"]
    assert [r["task"] for r in whole["table"]] == list(DEMO_TASKS) and whole["short_side"] == 16
    for name in whole["photographs"]:
        grid = Image.open(out / f"grid_whole_{name}.png")
        assert grid.height > len(DEMO_TASKS) * 16
        for task in DEMO_TASKS:
            assert (out / "images" / "whole" / f"{name}_{task}_restored.png").is_file()
    shapes = {tuple(e["shape"]) for t in whole["tasks"].values() for e in t["per_image"]}
    assert shapes == {(3, 16, 24)}
    for t in whole["tasks"].values():
        best = t["baseline"]
        for e in t["per_image"]:
            assert e["psnr_baseline"] == e["baselines_psnr"][best]
    assert "whole photographs" in text


def test_demo_cli_one_task(tmp_path, capsys):
    rc = main(["demo", "-o", str(tmp_path / "d"), "--size", "16", "--steps", "2", "--tasks", "colorize",
               "--images", "coffee", "--no-progress", "--no-inversion", "--json", str(tmp_path / "m.json")])
    assert rc == 0
    assert "colorize" in capsys.readouterr().out
    assert (tmp_path / "d" / "grid_colorize.png").is_file() and (tmp_path / "m.json").is_file()
    assert "inversion" not in json.loads((tmp_path / "m.json").read_text())
    assert not (tmp_path / "d" / grid_name()).exists()
    assert main(["demo", "-o", str(tmp_path / "w"), "--size", "16", "--steps", "2", "--tasks", "colorize",
                 "--images", "coffee", "--no-progress", "--no-inversion", "--whole", "0"]) == 0
    assert not (tmp_path / "w" / "grid_whole_coffee.png").exists()
    assert main(["demo", "-o", str(tmp_path / "v"), "--size", "16", "--whole", "4"]) == 2
    assert "must be 0 (off) or >= 8" in capsys.readouterr().err
    assert main(["demo", "-o", str(tmp_path / "e"), "--size", "18"]) == 2
    assert "multiple of 4" in capsys.readouterr().err


def test_demo_inversion_stage_tiny(tmp_path):
    out = tmp_path / "inv"
    res = run_demo(out_dir=out, size=16, steps=3, tasks=["colorize"], images=["coffee"], inversion_iters=3,
                   progress=False)
    inv = json.loads((out / "metrics.json").read_text())["inversion"]
    assert "oracle" in grid_name(inv["task"]) and (out / grid_name(inv["task"])).is_file()
    for col in INVERSION_COLUMNS:
        assert (out / "images" / f"inversion_{inv['task']}" / f"coffee_{col}.png").is_file()
    assert "after_oracle" in INVERSION_COLUMNS
    # the ground-truth run is labelled oracle; the blind one is not
    assert inv["after_oracle"]["oracle"] is True and inv["after_consistency"]["oracle"] is False
    assert "after_oracle" in inv and "psnr_change_oracle" in inv
    for key in ("before", "after_consistency", "after_oracle"):
        assert set(inv[key]["mean"]) == {"psnr", "ssim", "residual"}
    assert inv["after_consistency"]["evaluations"] == 3 and inv["sigma_y"] > 0
    # the blind objective lowers the measurement residual ||A x0 - y||
    assert inv["after_consistency"]["residual"][0] < inv["before"]["residual"][0]
    text = format_demo(res)
    assert "after ORACLE" in text and "after consistency (blind)" in text


def test_demo_bad_arguments(tmp_path):
    with pytest.raises(DeqirError, match="unknown demo task"):
        run_demo(out_dir=tmp_path, tasks=["sr_x8"], progress=False)
    with pytest.raises(DeqirError, match="no held-out image"):
        run_demo(out_dir=tmp_path, images=["rocket"], size=16, progress=False)   # a training photograph
    with pytest.raises(DeqirError, match="inversion_iters must be a positive integer"):
        run_demo(out_dir=tmp_path, size=16, inversion_iters=0, progress=False)


def test_builtin_bench_images():
    x = builtin_bench_images(5, 32)
    assert x.shape == (5, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x, builtin_bench_images(5, 32))
    assert not torch.equal(x[0], x[2])           # the ring of offsets gives new crops
    with pytest.raises(DeqirError, match="multiple of 4"):
        builtin_bench_images(2, 30)


def test_demo_bad_flags_fail_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    threads = torch.get_num_threads()
    base = ["demo", "--size", "16", "--steps", "2", "--tasks", "colorize", "--images", "coffee", "--no-progress",
            "--no-inversion"]
    cases = [(["--threads", "-1"], "--threads must be a positive integer"),
             (["--threads", "0"], "--threads must be a positive integer"),
             (["--device", "nosuch"], "unknown device"),
             (["--json", str(tmp_path / "afile" / "m.json")], "not a directory"),
             (["--json", str(tmp_path)], "is a folder"),
             (["--warm-start", "-1"], "warm_start")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "sees no CUDA device"))
    for i, (extra, match) in enumerate(cases):
        out = tmp_path / f"out{i}"
        assert main([*base, "-o", str(out), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("deqir: error: ") and err.count("\n") == 1 and match in err, err
        assert not out.exists(), extra
    assert torch.get_num_threads() == threads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_demo_json_in_a_missing_folder_is_created(tmp_path, capsys):
    target = tmp_path / "new" / "sub" / "m.json"
    assert main(["demo", "-o", str(tmp_path / "d"), "--size", "16", "--steps", "2", "--tasks", "colorize",
                 "--images", "coffee", "--no-progress", "--no-inversion", "--threads", "1", "--json", str(target)]) == 0
    assert json.loads(target.read_text())["table"][0]["task"] == "colorize"


def test_whole_photo_of_any_aspect_ratio(tmp_path):
    """A photograph whose downscaled size is no multiple of 4: SR x4 measures a centre crop of it
    (a few pixels), every other task the whole of it (restore pads), and one grid holds both."""
    import numpy as np

    from deqir_dist.apps.demo_whole import run_whole
    from deqir_dist.dataset.tasks import measurable
    from deqir_dist.models.builtin import load_builtin
    assert tuple(measurable(torch.zeros(3, 64, 86), "sr_bicubic_x4").shape) == (3, 64, 84)
    assert tuple(measurable(torch.zeros(3, 64, 86), "inpaint_box").shape) == (3, 64, 86)
    img = np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    block = run_whole(load_builtin(), {"odd": img}, 18, ["sr_bicubic_x4", "deblur_gauss"], 0,
                      tmp_path)
    shapes = {t: block["tasks"][t]["per_image"][0]["shape"] for t in block["tasks"]}
    assert shapes == {"sr_bicubic_x4": [3, 16, 24], "deblur_gauss": [3, 18, 27]}
    assert Image.open(tmp_path / "grid_whole_odd.png").height > 2 * 18
    assert Image.open(tmp_path / "images" / "whole" / "odd_deblur_gauss_restored.png").size == (27, 18)
    # restored as restore() with no sampler argument restores: the model card's settings
    from deqir_dist.models.settings import resolve_settings
    card = resolve_settings(load_builtin(), "sr_bicubic")[0]
    assert block["tasks"]["sr_bicubic_x4"]["settings"] == {k: card[k] for k in ("steps", "etw", "nw", "clip_x0")}

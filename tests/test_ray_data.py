"""Ray Data's ``DeqirRestorer``: the same PNG bytes as ``deqir restore``, a bad row is an error row.

The class is called as Ray Data calls it (a batch of columns bytes / path); the real
``map_batches`` pipeline runs too where Ray Data (pyarrow) is installed.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from deqir_dist.apps.cli import main
from deqir_dist.errors import DeqirError
from deqir_dist.io.images import write_image
from deqir_dist.ray import DeqirRestorer

FLAGS = {"model": "analytic", "task": "sr_avgpool", "scale": 2, "steps": 4, "solver": "serial", "seed": 5}


def _images(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        write_image(folder / f"im{i}.png", torch.rand(3, 12, 12, generator=g) * 2 - 1)
    return folder


def _cli(args, capsys):
    code = main([str(a) for a in args])
    capsys.readouterr()
    assert code == 0


def _batch(files):
    return {"bytes": [Path(f).read_bytes() for f in files], "path": [str(f) for f in files]}


def test_rows_are_the_cli_bytes_and_a_corrupt_file_is_an_error_row(tmp_path, capsys):
    clean = _images(tmp_path / "clean")
    _cli(["restore", clean, "--from-clean", "--task", "sr_avgpool", "--scale", "2", "--model", "analytic",
          "--steps", "4", "--solver", "serial", "--seed", "5", "-o", tmp_path / "cli", "--no-progress"], capsys)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)       # a truncated PNG
    files = sorted(clean.glob("*.png")) + [tmp_path / "bad.png"]
    out = DeqirRestorer(**FLAGS, from_clean=True)(_batch(files))
    assert list(out["id"]) == ["im0", "im1", "im2", "bad"] and list(out["status"]) == ["ok"] * 3 + ["error"]
    for i in range(3):
        assert out["png"][i] == (tmp_path / "cli" / f"im{i}.png").read_bytes()
        assert out["iterations"][i] == 4 and out["solver"][i] == "serial" and out["error"][i] is None
    assert out["png"][3] is None and "bad.png" in out["error"][3] and "\n" not in out["error"][3]


def test_described_16_bit_measurements_decode_as_the_cli_does(tmp_path, capsys):
    clean = _images(tmp_path / "clean", 2)
    _cli(["degrade", clean, "--task", "sr_avgpool", "--scale", "2", "-o", tmp_path / "meas"], capsys)
    _cli(["restore", tmp_path / "meas", "--model", "analytic", "--steps", "3", "--solver", "serial",
          "-o", tmp_path / "cli", "--no-progress"], capsys)         # no --task: the PNGs describe it
    files = sorted((tmp_path / "meas").glob("*.png"))
    out = DeqirRestorer(model="analytic", steps=3, solver="serial")(_batch(files))
    assert list(out["status"]) == ["ok", "ok"]
    for name, png in zip(out["id"], out["png"]):
        assert png == (tmp_path / "cli" / f"{name}.png").read_bytes()


def test_bad_arguments_are_one_line():
    for kw, match in (({"scael": 2}, "unknown argument"), ({"task": "sr_nothing"}, "unknown task"),
                      ({"task": "sr_avgpool", "mask": "box"}, "--mask does not apply"),
                      ({"steps": 0}, "steps must be"), ({"bits": 12}, "bits must be 8 or 16")):
        with pytest.raises(DeqirError, match=match):
            DeqirRestorer(model="analytic", **kw)
    with pytest.raises(DeqirError, match="columns bytes and path"):
        DeqirRestorer(model="analytic", task="denoise")({"data": [b""]})


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="Ray Data needs pyarrow (ray[data])")
def test_a_ray_data_pipeline_writes_the_cli_bytes(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    clean = _images(tmp_path / "clean", 4)
    (clean / "zz_bad.png").write_bytes(b"not a png")
    _cli(["restore", *sorted(clean.glob("im*.png")), "--from-clean", "--task", "sr_avgpool", "--scale", "2",
          "--model", "analytic", "--steps", "4", "--solver", "serial", "--seed", "5", "-o", tmp_path / "cli",
          "--no-progress"], capsys)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    try:
        ds = ray.data.read_binary_files(str(clean), include_paths=True)
        rows = ds.map_batches(DeqirRestorer, fn_constructor_kwargs={**FLAGS, "from_clean": True}, batch_size=2,
                              compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    finally:
        if started:
            ray.shutdown()
    by_id = {r["id"]: r for r in rows}
    assert sorted(by_id) == ["im0", "im1", "im2", "im3", "zz_bad"]
    assert by_id["zz_bad"]["status"] == "error" and by_id["zz_bad"]["png"] is None
    for i in range(4):
        assert by_id[f"im{i}"]["png"] == (tmp_path / "cli" / f"im{i}.png").read_bytes()


@pytest.mark.slow
def test_ray_restore_runs_a_diffusers_folder_with_the_cli_bytes(tmp_path, capsys):
    pytest.importorskip("ray")
    from tests.diffusers_folders import GOOGLE_SCHEDULER, SMALL_GOOGLE, write_model
    folder = write_model(tmp_path / "m", SMALL_GOOGLE, scheduler={**GOOGLE_SCHEDULER, "prediction_type": "v_prediction"})
    clean = _images(tmp_path / "clean", 2)
    common = ["--from-clean", "--task", "sr_avgpool", "--scale", "2", "--model", folder, "--steps", "3",
              "--solver", "serial", "--no-progress"]
    _cli(["restore", clean, *common, "-o", tmp_path / "cli"], capsys)
    _cli(["ray-restore", clean, *common, "-o", tmp_path / "ray", "--address", "local"], capsys)
    for i in range(2):
        assert (tmp_path / "ray" / f"im{i}.png").read_bytes() == (tmp_path / "cli" / f"im{i}.png").read_bytes()


@pytest.mark.slow
def test_a_gang_per_actor_shards_each_image(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    import numpy as np
    from PIL import Image
    clean = _images(tmp_path / "clean", 2)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    flags = {**FLAGS, "solver": "picard", "steps": 6}
    _cli(["restore", clean, "--from-clean", "--task", "sr_avgpool", "--scale", "2", "--model", "analytic",
          "--steps", "6", "--solver", "picard", "--seed", "5", "-o", tmp_path / "cli", "--no-progress"], capsys)
    with pytest.raises(DeqirError, match="shards the chain"):
        DeqirRestorer(**FLAGS, gpus_per_worker=2)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 1024**2)
    try:
        restorer = DeqirRestorer(**flags, from_clean=True, gpus_per_worker=2)
        try:
            out = restorer(_batch(sorted(clean.glob("*.png")) + [tmp_path / "bad.png"]))
        finally:
            restorer.close()
    finally:
        if started:
            ray.shutdown()
    assert list(out["status"]) == ["ok", "ok", "error"] and "bad.png" in out["error"][2]
    for i in range(2):                      # the sharded chain == one process (to a grey level, as ray-restore's gangs)
        a = np.asarray(Image.open(tmp_path / "cli" / f"im{i}.png")).astype(int)
        (tmp_path / "g.png").write_bytes(out["png"][i])
        assert np.abs(np.asarray(Image.open(tmp_path / "g.png")).astype(int) - a).max() <= 1

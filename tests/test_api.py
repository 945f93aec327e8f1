"""The public API a user types: restore_file, the result's pictures, the package's face."""
import numpy as np
import pytest
import torch
from PIL import Image

import deqir_dist as dq
from deqir_dist.apps.cli import main


@pytest.fixture()
def photo(tmp_path):
    yy, xx = np.mgrid[0:16, 0:16]
    img = np.stack([np.sin(xx / 3), np.cos(yy / 4), np.sin((xx + yy) / 6)], -1)
    img = ((img + 1) * 127.5).clip(0, 255).astype(np.uint8)
    p = tmp_path / "cat.png"
    Image.fromarray(img).save(p)
    return p


def test_restore_file_gives_the_cli_picture(photo, tmp_path, capsys):
    """One file through the API and through `deqir degrade` + `deqir restore`: the same pixels."""
    meas = tmp_path / "meas"
    assert main(["degrade", str(photo), "--task", "sr_avgpool", "--scale", "2", "-o", str(meas)]) == 0
    assert main(["restore", str(meas / "cat.png"), "--task", "sr_avgpool", "--scale", "2", "--model", "analytic",
                 "--steps", "6", "--no-progress", "-o", str(tmp_path / "cli")]) == 0
    capsys.readouterr()
    res = dq.restore_file(meas / "cat.png", "sr_avgpool", model="analytic", scale=2, steps=6,
                          out=tmp_path / "api.png")
    cli = np.asarray(Image.open(tmp_path / "cli" / "cat.png"))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "api.png")), cli)
    assert np.array_equal(np.asarray(res.to_pil()[0]), cli)
    assert res.images.shape == (1, 3, 16, 16) and float(res.images.abs().max()) <= 1.0


def test_restore_file_from_clean_and_errors(photo, tmp_path):
    res = dq.restore_file(photo, "inpaint", model="analytic", from_clean=True, mask="random", steps=4)
    assert res.image.shape == (1, 3, 16, 16)
    with pytest.raises(dq.DeqirError, match="not found"):
        dq.restore_file(tmp_path / "nope.png", "inpaint", model="analytic")
    with pytest.raises(dq.DeqirError, match="does not apply"):
        dq.restore_file(photo, "inpaint", model="analytic", from_clean=True, scale=2)


def test_images_are_clipped_copies():
    r = dq.RestoreResult(image=torch.tensor([[[[-3.0, 0.5]]]]), iterations=1, iterations_per_image=[1],
                         trace=[], solver="serial", steps=1, stop="none", stop_tol=0.0, seconds=0.0)
    assert r.images.tolist() == [[[[-1.0, 0.5]]]]
    assert r.image.min() == -3.0                 # the raw chain output is left as it is
    assert r.to_pil()[0].mode == "L"

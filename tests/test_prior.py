"""The built-in prior: shipped weights + card, loading, training reproducibility, baselines."""
import hashlib
import json

import pytest
import torch

from deqir_dist.errors import DeqirError
from deqir_dist.models import builtin
from deqir_dist.models.builtin import (
    BUILTIN_CARD,
    BUILTIN_CONFIG,
    BUILTIN_WEIGHTS,
    load_builtin,
)
from deqir_dist.physics.registry import make_operator
from deqir_dist.quality.baselines import (
    back_project,
    baselines_for,
    best_baseline,
    bicubic_up,
    blur_matrices,
    fill_harmonic,
    fill_mean,
    fill_nearest,
    tikhonov_deblur,
)
from deqir_dist.quality.metrics import psnr


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------- shipped weights and card

def test_card_matches_shipped_weights():
    card = json.loads(BUILTIN_CARD.read_text())
    w = card["weights"]
    assert w["file"] == BUILTIN_WEIGHTS.name
    assert w["sha256"] == _sha(BUILTIN_WEIGHTS)
    assert w["bytes"] == BUILTIN_WEIGHTS.stat().st_size < 20_000_000
    model = load_builtin()
    assert w["parameters"] == sum(p.numel() for p in model.parameters())
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in card["config"].items()} == BUILTIN_CONFIG
    assert card["command"].startswith("deqir train-prior ")
    train = {d["name"] for d in card["data"]["train_images"]}
    held = {d["name"] for d in card["data"]["heldout_images"]}
    assert len(held) >= 2 and not train & held and "cat" not in train
    assert card["training"]["wall_seconds"] > 0 and card["training"]["final_loss"] > 0
    assert set(card["validation"]["eps_mse"]) and card["validation"]["restoration"]["tasks"]
    assert set(builtin.builtin_heldout()) == held


def test_load_builtin_runs_at_multiples_of_four():
    model = load_builtin()
    assert not model.training and next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        for h, w in ((64, 64), (48, 80)):
            x = torch.randn(2, 3, h, w)
            out = model(x, torch.tensor([10, 500]))
            assert out.shape == (2, 3, h, w) and torch.isfinite(out).all()
        with pytest.raises(DeqirError, match="multiple of 4"):
            model(torch.randn(1, 3, 62, 64), torch.tensor([10]))
    half = load_builtin(dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_builtin_missing_or_corrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(builtin, "BUILTIN_WEIGHTS", tmp_path / "builtin.safetensors")
    with pytest.raises(DeqirError, match="missing.*train-prior"):
        builtin.load_builtin()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DeqirError, match="cannot read"):
        builtin.load_builtin(path=bad)


# ----------------------------------------------------------------------------- training

def _tiny_cfg(**kw):
    from deqir_dist.apps.prior_training import TrainConfig
    base = dict(model=dict(ch=32, out_ch=3, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0,
                           in_channels=3, resolution=16, resamp_with_conv=True),
                steps=4, batch=2, crops=(8, 16), warmup=2, val_every=2, val_crops=2, val_size=16,
                train_images=("astronaut",), heldout_images=("chelsea",), min_short=32, max_short=48,
                pyramid_levels=2, restore_eval=False, threads=1)
    base.update(kw)
    return TrainConfig(**base)


def test_tiny_training_is_reproducible_and_writes_weights_and_card(tmp_path):
    pytest.importorskip("skimage")
    from deqir_dist.apps.prior_training import train_prior
    from deqir_dist.apps.train_prior import write_prior
    a = train_prior(_tiny_cfg(), progress=False, log_path=tmp_path / "loss.csv")
    b = train_prior(_tiny_cfg(), progress=False)
    assert len(a["losses"]) == 4 and a["losses"] == b["losses"]
    c = train_prior(_tiny_cfg(seed=1), progress=False)
    assert c["losses"] != a["losses"]
    assert (tmp_path / "loss.csv").read_text().count("\n") == 5
    w, card_path = write_prior(a, tmp_path / "p.safetensors", command="deqir train-prior -o p.safetensors")
    card = json.loads(card_path.read_text())
    assert card_path == tmp_path / "p.json" and card["weights"]["sha256"] == _sha(w)
    assert card["data"]["heldout_images"][0]["name"] == "chelsea"
    assert card["validation"]["eps_mse_history"][0]["step"] == 2 and card["validation"]["eps_mse"]
    model = load_builtin(path=w)
    sd = a["model"].state_dict()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k].half().float())
    assert set(builtin.builtin_heldout(w)) == {"chelsea"}


def test_train_prior_cli_and_bad_settings(tmp_path, capsys):
    pytest.importorskip("skimage")
    from deqir_dist.apps.cli import main
    from deqir_dist.apps.prior_training import TrainConfig, train_prior
    out = tmp_path / "cli.safetensors"
    rc = main(["train-prior", "-o", str(out), "--steps", "2", "--batch", "1", "--crops", "16", "--ch-mult", "1,2",
               "--train-images", "rocket", "--heldout-images", "coffee", "--val-crops", "1", "--threads", "1",
               "--no-restore-eval", "--no-progress"])
    assert rc == 0 and out.is_file() and (tmp_path / "cli.json").is_file() and (tmp_path / "cli.loss.csv").is_file()
    card = json.loads((tmp_path / "cli.json").read_text())
    assert card["command"].startswith("deqir train-prior -o") and "--steps 2" in card["command"]
    with pytest.raises(DeqirError, match="overlap"):
        train_prior(_tiny_cfg(train_images=("chelsea",)), progress=False)
    with pytest.raises(DeqirError, match="multiples of 2"):
        train_prior(_tiny_cfg(crops=(9,)), progress=False)
    with pytest.raises(DeqirError, match="unknown training setting"):
        TrainConfig(stepz=3)
    assert main(["train-prior", "-o", str(tmp_path / "x.pt"), "--steps", "1"]) == 2
    assert "safetensors" in capsys.readouterr().err


# ----------------------------------------------------------------------------- baselines

def _smooth(b=2, c=3, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h // 8, w // 8, generator=g)
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(-1, 1)


def test_sr_baselines():
    x = _smooth()
    op = make_operator("sr_bicubic", (3, 32, 32), scale=4)
    y = op.A(x)
    const = torch.full((1, 3, 8, 8), 0.3)
    torch.testing.assert_close(bicubic_up(const, 4), torch.full((1, 3, 32, 32), 0.3))
    bp = back_project(op, y, bicubic_up(y, 4))
    torch.testing.assert_close(op.A(bp), y, atol=1e-5, rtol=0)
    c = baselines_for(op, y)
    assert set(c) == {"bicubic", "pinv", "bicubic+bp"}
    name, est = best_baseline(op, y, x)
    assert name in c and torch.equal(est, c[name])
    assert float(psnr(est.clamp(-1, 1), x).mean()) == max(float(psnr(v.clamp(-1, 1), x).mean()) for v in c.values())


def test_deblur_baselines():
    x = _smooth(h=32, w=48)
    op = make_operator("deblur_gauss", (3, 32, 48), size=5, sigma=2.0)
    y = op.A(x)
    Kh, Kw = blur_matrices(op)
    torch.testing.assert_close((Kh @ x.double() @ Kw.T).float(), y, atol=1e-5, rtol=0)
    est = tikhonov_deblur(op, y, 1e-9)          # nearly the exact inverse on noiseless data
    assert float(psnr(est, x).min()) > 45
    assert float(psnr(tikhonov_deblur(op, y, 1e-2), x).min()) < float(psnr(est, x).min())
    assert "tikhonov(0.001)" in baselines_for(op, y)
    with pytest.raises(DeqirError, match="blur"):
        blur_matrices(make_operator("colorize", (3, 8, 8)))


def test_inpaint_baselines():
    h = w = 24
    ramp = (torch.arange(w, dtype=torch.float32) / w - 0.5)[None, None, None, :].expand(1, 3, h, w) \
        + (torch.arange(h, dtype=torch.float32) / h * 0.5)[None, None, :, None]
    op = make_operator("inpaint", (3, h, w), mask="box", fraction=0.25)
    y = op.A(ramp)
    m = op.mask[None, None]
    # a linear ramp is harmonic: the membrane fill of an interior hole reproduces it
    torch.testing.assert_close(fill_harmonic(y, m), ramp, atol=1e-4, rtol=0)
    const = torch.full((1, 3, h, w), -0.4)
    torch.testing.assert_close(fill_nearest(op.A(const), m), const)
    torch.testing.assert_close(fill_mean(op.A(const), m), const)
    nearest = fill_nearest(y, m)
    assert torch.equal(nearest * m, y * m)       # observed pixels untouched
    rnd = make_operator("inpaint", (3, h, w), mask="random")
    name, est = best_baseline(rnd, rnd.A(ramp), ramp)
    assert name == "harmonic" and float(psnr(est, ramp)) > 40


# ----------------------------------------------------------------------------- train-prior: failing early

_TINY_CLI = ["--steps", "2", "--batch", "1", "--crops", "16", "--ch-mult", "1,2", "--train-images", "rocket",
             "--heldout-images", "coffee", "--val-crops", "1", "--no-restore-eval", "--no-progress"]


def test_train_prior_checks_settings_and_outputs_before_training(tmp_path, capsys, monkeypatch):
    from deqir_dist.apps import train_prior as prior
    from deqir_dist.apps.cli import main

    def no_training(*a, **k):
        raise AssertionError("trained despite a bad setting")
    monkeypatch.setattr(prior, "train_prior", no_training)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "w" / "x.safetensors"
    cases = [(["--card", tmp_path / "afile" / "c.json"], "not a directory"),
             (["--log", tmp_path / "afile" / "l.csv"], "not a directory"),
             (["--card", out], "same file"),
             (["--log", tmp_path], "is a folder"),
             (["--device", "nosuch"], "unknown device"),
             (["--threads", "0"], "--threads must be a positive integer"),
             (["--threads", "-1"], "--threads must be a positive integer"),
             (["--time-limit", "-1"], "--time-limit must be a positive"),
             (["--time-limit", "0"], "--time-limit must be a positive"),
             (["--warmup", "-5"], "--warmup must be >= 0")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "sees no CUDA device"))
    for extra, match in cases:
        assert main(["train-prior", "-o", str(out), *_TINY_CLI, *map(str, extra)]) == 2, extra
        err = capsys.readouterr().err
        assert err.startswith("deqir: error: ") and err.count("\n") == 1 and match in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]      # not even the folder of -o


def test_train_prior_log_in_a_missing_folder(tmp_path, capsys):
    pytest.importorskip("skimage")
    from deqir_dist.apps.cli import main
    out, log = tmp_path / "p.safetensors", tmp_path / "logs" / "run1" / "l.csv"
    assert main(["train-prior", "-o", str(out), "--log", str(log), "--threads", "1", *_TINY_CLI]) == 0
    assert out.is_file() and (tmp_path / "p.json").is_file() and log.read_text().count("\n") == 3
    assert not [p for p in tmp_path.rglob(".*")]                        # no temp files left


def test_weights_and_card_appear_together_or_not_at_all(tmp_path, monkeypatch):
    pytest.importorskip("skimage")
    import os

    from deqir_dist.apps.prior_training import train_prior
    from deqir_dist.apps.train_prior import write_prior
    result = train_prior(_tiny_cfg(steps=1, val_every=0), progress=False)
    real_replace = os.replace

    def failing_replace(src, dst):                  # the card's final rename fails
        if str(src).endswith(".tmp") and str(dst).endswith(".json"):
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(DeqirError, match="cannot write .*c.json"):
        write_prior(result, tmp_path / "p.safetensors", tmp_path / "cards" / "c.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == []             # no weights, card, folder or temp file
    monkeypatch.setattr(os, "replace", real_replace)
    w, c = write_prior(result, tmp_path / "p.safetensors", tmp_path / "cards" / "c.json")
    card = json.loads(c.read_text())
    assert card["weights"]["sha256"] == _sha(w) and card["weights"]["bytes"] == w.stat().st_size
    # a failed rewrite leaves the earlier pair as it was
    before = {p: p.read_bytes() for p in (w, c)}
    other = train_prior(_tiny_cfg(steps=1, val_every=0, seed=3), progress=False)
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(DeqirError):
        write_prior(other, w, c)
    monkeypatch.setattr(os, "replace", real_replace)
    assert {p: p.read_bytes() for p in (w, c)} == before
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["c.json", "cards", "p.safetensors"]


def test_init_fine_tunes_from_a_weights_file_and_refuses_another_architecture(tmp_path):
    pytest.importorskip("skimage")
    from deqir_dist.apps.prior_training import init_weights, train_prior
    from deqir_dist.apps.train_prior import write_prior
    first = train_prior(_tiny_cfg(), progress=False)
    w, _ = write_prior(first, tmp_path / "a.safetensors", command="deqir train-prior -o a.safetensors")
    start = init_weights(w, _tiny_cfg()["model"])
    tuned = train_prior(_tiny_cfg(init=str(w)), progress=False)
    fresh = train_prior(_tiny_cfg(), progress=False)
    # the run started from a's weights (stored in float16), not from the seed's initialisation
    assert tuned["losses"][0] != fresh["losses"][0]
    _, card_path = write_prior(tuned, tmp_path / "b.safetensors", command="deqir train-prior --init a.safetensors")
    card = json.loads(card_path.read_text())
    assert card["training"]["init"]["sha256"] == _sha(w) and card["training"]["init"]["file"] == "a.safetensors"
    assert json.loads((tmp_path / "a.json").read_text())["training"]["init"] is None
    for k, v in start.items():
        assert v.dtype == torch.float32 and k in first["model"].state_dict()
    other = dict(_tiny_cfg()["model"], ch=64)
    with pytest.raises(DeqirError, match="its ch is 32"):
        init_weights(w, other)
    with pytest.raises(DeqirError, match="not found"):
        init_weights(tmp_path / "missing.safetensors", other)
    fewer = dict(_tiny_cfg()["model"], num_res_blocks=0)
    with pytest.raises(DeqirError, match="its num_res_blocks is 1"):
        init_weights(w, fewer)


def test_init_with_more_res_blocks_starts_from_the_same_function(tmp_path):
    """--init a prior with --res-blocks above its own: the deepened model (models.ddpm.deepen)
    gives the init file's eps exactly, and the card says it was deepened."""
    pytest.importorskip("skimage")
    from deqir_dist.apps.prior_training import init_weights, train_prior
    from deqir_dist.apps.train_prior import write_prior
    from deqir_dist.models.ddpm import DDPMUNet
    first = train_prior(_tiny_cfg(), progress=False)
    w, _ = write_prior(first, tmp_path / "a.safetensors", command="deqir train-prior -o a.safetensors")
    deep_cfg = dict(_tiny_cfg()["model"], num_res_blocks=3)
    small, deep = DDPMUNet(**_tiny_cfg()["model"]).eval(), DDPMUNet(**deep_cfg).eval()
    small.load_state_dict(init_weights(w, _tiny_cfg()["model"]))
    deep.load_state_dict(init_weights(w, deep_cfg))
    x, t = torch.randn(2, 3, 16, 24), torch.tensor([5, 900])
    with torch.no_grad():
        assert torch.equal(small(x, t), deep(x, t))
    tuned = train_prior(_tiny_cfg(init=str(w), model=deep_cfg), progress=False)
    _, card_path = write_prior(tuned, tmp_path / "b.safetensors", command="deqir train-prior --init a.safetensors")
    init = json.loads(card_path.read_text())["training"]["init"]
    assert init["deepened"]["from_res_blocks"] == 1 and init["deepened"]["to_res_blocks"] == 3


def test_stored_photo_folder_stores_as_the_weights_file_does(tmp_path):
    import numpy as np
    from PIL import Image

    from deqir_dist.data.photos import HELDOUT_SHORT, stored_photo_folder
    Image.fromarray(np.zeros((400, 600, 3), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "notes.txt").write_text("not a photo")
    got = stored_photo_folder(tmp_path)
    assert list(got) == ["big", "small"]
    assert got["big"].shape == (HELDOUT_SHORT, 384, 3) and got["small"].shape == (40, 60, 3)
    with pytest.raises(DeqirError, match="no PNG photographs"):
        stored_photo_folder(tmp_path / "missing")


def test_min_snr_weighting_and_channels_last(tmp_path):
    """--loss-weight min_snr:GAMMA scales each crop's eps-MSE by min(SNR, GAMMA) / SNR (checked against the
    plain loss on one step from the same state); channels-last trains the same network (same losses to
    float rounding); a bad weight is one line."""
    pytest.importorskip("skimage")
    from deqir_dist.apps import prior_training as pt
    plain = pt.train_prior(_tiny_cfg(steps=1, val_every=0), progress=False)["losses"][0]
    # gamma below every SNR of the schedule (the smallest, at t = 999, is 4e-5): every weight is
    # gamma / SNR <= 0.03, whichever t the step draws
    weighted = pt.train_prior(_tiny_cfg(steps=1, val_every=0, loss_weight="min_snr:1e-6"), progress=False)["losses"][0]
    assert weighted < 0.03 * plain
    huge = pt.train_prior(_tiny_cfg(steps=1, val_every=0, loss_weight="min_snr:1e12"), progress=False)["losses"][0]
    assert huge == pytest.approx(plain, rel=1e-5)       # gamma above every SNR: the plain loss
    cl = pt.train_prior(_tiny_cfg(steps=3, val_every=0, channels_last=True, amp="none"), progress=False)["losses"]
    ref = pt.train_prior(_tiny_cfg(steps=3, val_every=0, amp="none"), progress=False)["losses"]
    assert cl == pytest.approx(ref, rel=1e-3)
    for bad in ("min_snr:0", "min_snr:x", "snr"):
        with pytest.raises(DeqirError, match="loss weight must be"):
            pt.train_prior(_tiny_cfg(loss_weight=bad), progress=False)


def test_card_records_where_folder_photographs_came_from(tmp_path):
    """A --data folder's photographs reach the card with their package and licence (read from the
    folder's manifest.json), the summary counts them apart from scikit-image's; an unreadable
    manifest is one line."""
    pytest.importorskip("skimage")
    import numpy as np
    from PIL import Image

    from deqir_dist.apps.prior_training import train_prior
    from deqir_dist.apps.train_prior import write_prior
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "heldout").mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 96, 3), dtype=np.uint8)).save(data / "train" / "meadow.png")
    (data / "manifest.json").write_text(json.dumps({"command": "python bench/prior_data.py -o data", "files": [
        {"name": "meadow", "split": "train", "licence": "CC-BY-SA-4.0",
         "source": {"debian_package": "some-wallpapers", "path": "usr/share/backgrounds/meadow.jpg"}},
        {"name": "unused", "split": "train", "licence": "CC0", "source": {"debian_package": "x"}}]}))
    result = train_prior(_tiny_cfg(data_dir=str(data)), progress=False)
    _, card_path = write_prior(result, tmp_path / "p.safetensors", command="deqir train-prior --data data")
    card = json.loads(card_path.read_text())
    n = len(card["data"]["train_images"])
    assert f"trained on {n} natural photographs ({n - 1} bundled with scikit-image, 1 from Debian" in card["summary"]
    assert card["data"]["files"] == {"meadow": {"split": "train", "licence": "CC-BY-SA-4.0", "source": {
        "debian_package": "some-wallpapers", "path": "usr/share/backgrounds/meadow.jpg"}}}
    assert card["data"]["data_command"] == "python bench/prior_data.py -o data"
    (data / "manifest.json").write_text("{" * 100000)
    with pytest.raises(DeqirError, match="not a readable prior_data.py manifest"):
        write_prior(result, tmp_path / "q.safetensors", command="x")

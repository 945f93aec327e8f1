"""Issue 16: what a user gets by default (model-card sampler settings, faithful measurements,
any image size, SSIM on [0, 1])."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import structural_similarity

from deqir_dist.api.restore import restore
from deqir_dist.apps.cli import main
from deqir_dist.io.quantization import default_sigma_y, quantization_sigma, sample_bits
from deqir_dist.models.analytic import GaussianMixtureDenoiser
from deqir_dist.models.builtin import builtin_bench_images, load_builtin
from deqir_dist.models.settings import (
    LIBRARY_DEFAULTS,
    PRESET_SAMPLERS,
    resolve_settings,
)
from deqir_dist.physics.padded import PaddedOperator
from deqir_dist.physics.registry import make_operator
from deqir_dist.quality.baselines import TIKHONOV_LAMBDAS, tikhonov_deblur
from deqir_dist.quality.metrics import psnr, ssim


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------- settings from the card

def test_builtin_card_recommends_its_settings():
    m = load_builtin()
    s, src = resolve_settings(m, "sr_bicubic")
    assert (s["etw"], s["nw"], s["steps"], s["clip_x0"]) == (0.8, 0.0, 100, False)
    assert src["etw"] == "model card builtin.json"
    assert resolve_settings(m, "colorize")[0]["clip_x0"] is True
    s, src = resolve_settings(m, "colorize", {"clip_x0": False, "etw": 0.0})
    assert (s["clip_x0"], s["etw"], src["etw"], src["nw"]) == (False, 0.0, "user", "model card builtin.json")


def test_no_card_library_defaults_and_presets():
    s, src = resolve_settings(GaussianMixtureDenoiser(), "inpaint")
    assert s == LIBRARY_DEFAULTS and set(src.values()) == {"library default (DeqIR's deterministic DDIM)"}
    # the public checkpoints: DeqIR's README settings, DDNM's as the alternative
    for card in PRESET_SAMPLERS.values():
        assert (card["steps"], card["etw"], card["nw"]) == (25, 0.1, 0.0)
        assert (card["alternatives"]["ddnm"]["etw"], card["alternatives"]["ddnm"]["steps"]) == (0.85, 100)


def test_restore_uses_the_card_exactly():
    """A model with a card restores exactly as the same model given the card's values by hand."""
    plain = GaussianMixtureDenoiser()
    carded = GaussianMixtureDenoiser()
    carded.sampler_card = {"steps": 10, "etw": 0.5, "nw": 0.2, "clip_x0": {"default": False, "inpaint": True},
                           "source": "model card test"}
    x = plain.sample(2, (3, 8, 8), generator=_gen(1)) if hasattr(plain, "sample") else torch.rand(2, 3, 8, 8) * 2 - 1
    op = make_operator("inpaint", (3, 8, 8), mask="random")
    y = op.A(x)
    a = restore(carded, y, op, solver="serial", generator=_gen())
    b = restore(plain, y, op, solver="serial", generator=_gen(), steps=10, etw=0.5, nw=0.2, clip_x0=True)
    torch.testing.assert_close(a.image, b.image, rtol=0, atol=0)
    assert a.settings == {"steps": 10, "etw": 0.5, "nw": 0.2, "clip_x0": True, "sigma_y": 0.0}
    assert a.settings_source["etw"] == "model card test" and b.settings_source["etw"] == "user"
    assert restore(plain, y, op, solver="serial", generator=_gen()).settings["etw"] == 0.0


# ----------------------------------------------------------------------------- faithful measurements

def test_quantization_sigma_and_bits():
    assert quantization_sigma(8) == pytest.approx(2 / 255 / 12 ** 0.5)
    u8 = torch.randint(0, 256, (1, 3, 5, 5)).double()
    assert sample_bits(u8 / 255 * 2 - 1) == 8
    assert sample_bits((u8 * 257) / 65535 * 2 - 1) == 8          # 8-bit data in a 16-bit file
    assert sample_bits(torch.randint(0, 65536, (1, 3, 5, 5)).double() / 65535 * 2 - 1) == 16
    assert default_sigma_y(torch.rand(1, 3, 5, 5) * 0.37)[0] == 0.0


def _dense(op, fn, n):
    return torch.stack([fn(e.view(1, *op.image_shape)).flatten() for e in torch.eye(n, dtype=torch.float64)], 1)


@pytest.mark.parametrize("task", ["deblur_gauss", "sr_bicubic"])
def test_for_noise_keeps_projector_identities(task):
    op = make_operator(task, (1, 8, 8), **({"scale": 2} if task == "sr_bicubic" else {}))
    assert op.for_noise(0.0) is op
    sig = 0.01 if task == "deblur_gauss" else 0.05
    reg = op.for_noise(sig)
    assert reg.rank < op.rank and op.rank == make_operator(task, (1, 8, 8), **(
        {"scale": 2} if task == "sr_bicubic" else {})).rank                       # the original is unchanged
    n = 64
    Q = _dense(reg, reg.Q, n)
    torch.testing.assert_close(Q @ Q, Q, atol=1e-10, rtol=0)
    torch.testing.assert_close(Q, Q.T, atol=1e-10, rtol=0)
    Apinv = torch.stack([reg.A_pinv(e.view(1, *reg.measurement_shape)).flatten()
                         for e in torch.eye(int(np.prod(reg.measurement_shape)), dtype=torch.float64)], 1)
    torch.testing.assert_close(Apinv @ _dense(reg, reg.A, n) @ Apinv, Apinv, atol=1e-9, rtol=0)
    # A+ of the filtered y is the Tikhonov estimate V s/(s^2 + sig^2) U^T y on the kept directions
    A = _dense(op, op.A, n)
    U, s, Vt = torch.linalg.svd(A, full_matrices=False)
    keep = s > reg.NOISE_KEEP * sig * s.max()       # relative to the largest gain
    y = torch.randn(1, *op.measurement_shape, dtype=torch.float64)
    want = Vt.T[:, keep] @ ((s / (s * s + sig ** 2))[keep] * (U.T[keep] @ y.flatten()))
    torch.testing.assert_close(reg.A_pinv(reg.filter_measurement(y, sig)).flatten(), want, atol=1e-9, rtol=0)


def test_noisy_chain_equals_serial():
    """sigma_y > 0 on a blur: the parallel fixed point is still the serial trajectory."""
    m = GaussianMixtureDenoiser()
    op = make_operator("deblur_gauss", (3, 8, 8))
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    y = op.A(x) + 0.003 * torch.randn(1, 3, 8, 8, generator=_gen(2))
    kw = {"steps": 12, "sigma_y": 0.003, "generator": None, "dtype": torch.float64}
    ser = restore(m, y, op, solver="serial", noise=torch.randn(1, 3, 8, 8, generator=_gen(3)), **kw)
    par = restore(m, y, op, solver="picard", stop="none", max_iter=12, noise=torch.randn(1, 3, 8, 8, generator=_gen(3)),
                  **kw)
    torch.testing.assert_close(par.image, ser.image, atol=1e-6, rtol=0)


def test_padded_operator_is_exact_and_restore_crops_back():
    inner = make_operator("sr_bicubic", (1, 6, 6), scale=2)
    op = PaddedOperator(inner, (8, 8))
    n = 64
    A = _dense(op, op.A, n)
    Ap = torch.stack([op.A_pinv(e.view(1, 1, 3, 3)).flatten() for e in torch.eye(9, dtype=torch.float64)], 1)
    torch.testing.assert_close(A @ Ap @ A, A, atol=1e-10, rtol=0)
    torch.testing.assert_close(Ap @ A @ Ap, Ap, atol=1e-10, rtol=0)
    torch.testing.assert_close(_dense(op, op.Q, n), Ap @ A, atol=1e-12, rtol=0)
    m = GaussianMixtureDenoiser()
    m.size_multiple = 4
    x = torch.rand(1, 3, 6, 10) * 2 - 1
    op3 = make_operator("sr_bicubic", (3, 6, 10), scale=2)
    res = restore(m, op3.A(x), op3, solver="serial", steps=8, generator=_gen())
    assert res.image.shape == (1, 3, 6, 10)
    torch.testing.assert_close(op3.A(res.image), op3.A(x), atol=1e-4, rtol=0)   # consistent with y


def test_8bit_deblur_beats_pinv_and_wiener():
    """The issue's worst case: an 8-bit blurred measurement, the built-in prior at its defaults."""
    torch.manual_seed(0)
    x = builtin_bench_images(2, 32)
    op = make_operator("deblur_gauss", (3, 32, 32))
    y8 = (((op.A(x) + 1) / 2).clamp(0, 1) * 255).round() / 255 * 2 - 1
    sig = default_sigma_y(y8)[0]
    assert sig == pytest.approx(quantization_sigma(8))
    out = restore(load_builtin(), y8, op, solver="serial", sigma_y=sig, generator=_gen()).images
    got = float(psnr(out, x).mean())
    wiener = max(float(psnr(tikhonov_deblur(op, y8, lam).clamp(-1, 1), x).mean()) for lam in TIKHONOV_LAMBDAS)
    pinv = float(psnr(op.A_pinv(y8).clamp(-1, 1), x).mean())
    assert got > wiener > pinv


def test_ssim_on_unit_range_equals_skimage_on_uint8():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 20, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    ref = structural_similarity(a, b, data_range=255, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)

    def t(u):
        return torch.from_numpy(u).permute(2, 0, 1)[None].double() / 255 * 2 - 1
    assert float(ssim(t(a), t(b))[0]) == pytest.approx(ref, abs=1e-6)


# ----------------------------------------------------------------------------- the CLI

def _png_bit_depth(path) -> int:
    with open(path, "rb") as f:
        head = f.read(33)
    return head[24]


def test_cli_degrade_16bit_and_restore_any_size_records_defaults(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (18, 22, 3), dtype=np.uint8)).save(src / "a.png")
    assert main(["degrade", str(src), "--task", "sr_bicubic", "--scale", "2", "-o", str(tmp_path / "m")]) == 0
    assert _png_bit_depth(tmp_path / "m" / "a.png") == 16
    Image.open(src / "a.png").resize((11, 9)).save(tmp_path / "b8.png")      # an 8-bit measurement, 18x22 image
    out = tmp_path / "r"
    assert main(["restore", str(tmp_path / "b8.png"), "--task", "sr_bicubic", "--scale", "2", "-o", str(out),
                 "--steps", "3", "--solver", "serial", "--no-progress"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    sampler = summary["sampler"]
    assert sampler["settings"]["etw"] == 0.8 and sampler["source"]["etw"] == "model card builtin.json"
    assert sampler["settings"]["steps"] == 3 and sampler["source"]["steps"] == "user"
    assert sampler["settings"]["sigma_y"] == pytest.approx(quantization_sigma(8), abs=1e-6)
    assert "8-bit" in sampler["source"]["sigma_y"]
    assert Image.open(out / "b8.png").size == (22, 18)


# ----------------------------------------------------------------------------- the prior's training

def test_training_resumes_bit_for_bit(tmp_path):
    """4 steps in one sitting == 2 steps, stop, then resume from the state file for 2 more."""
    pytest.importorskip("skimage")
    from deqir_dist.apps.prior_training import TrainConfig, train_prior
    from deqir_dist.errors import DeqirError

    def cfg(steps, **kw):
        return TrainConfig(model={"ch": 32, "out_ch": 3, "ch_mult": (1, 2), "num_res_blocks": 1,
                                  "attn_resolutions": (), "dropout": 0.0, "in_channels": 3, "resolution": 16,
                                  "resamp_with_conv": True},
                           steps=steps, batch=2, crops=(16,), warmup=1, val_every=0, val_crops=1, val_size=16,
                           restore_eval=False, amp="none", train_images=("astronaut",), heldout_images=("chelsea",), min_short=32,
                           max_short=48, pyramid_levels=2, threads=1,
                           **kw)
    whole = train_prior(cfg(4), progress=False)
    state = tmp_path / "state.pt"
    first = train_prior(cfg(4, state_path=str(state), state_every=2, time_limit_min=1e-9), progress=False)
    assert len(first["losses"]) == 1 and state.is_file()       # stopped by the time limit after one step
    again = train_prior(cfg(4, state_path=str(state), state_every=2), progress=False)
    assert again["losses"] == whole["losses"]
    for k, v in whole["model"].state_dict().items():
        torch.testing.assert_close(again["model"].state_dict()[k], v, rtol=0, atol=0)
    with pytest.raises(DeqirError, match="other settings"):
        train_prior(cfg(4, state_path=str(state), lr=5e-4), progress=False)


def test_ray_job_uses_the_card_and_the_bit_depth(tmp_path):
    """ray-restore on 8-bit measurements of a size that is not a multiple of 4, no sampler flag."""
    ray = pytest.importorskip("ray")
    rng = np.random.default_rng(1)
    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).save(src / f"m{i}.png")
    out = tmp_path / "out"
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, object_store_memory=128 * 1024**2)
    try:
        assert main(["ray-restore", str(src), "-o", str(out), "--task", "sr_bicubic", "--scale", "2",
                     "--steps", "2", "--no-progress", "--workers", "1"]) == 0
    finally:
        if started:
            ray.shutdown()
    sampler = json.loads((out / "summary.json").read_text())["sampler"]
    assert sampler["settings"]["etw"] == 0.8 and sampler["source"]["etw"] == "model card builtin.json"
    assert sampler["settings"]["steps"] == 2 and sampler["source"]["steps"] == "user"
    assert sampler["settings"]["sigma_y"] == pytest.approx(quantization_sigma(8)) and "8-bit" in sampler["source"]["sigma_y"]
    assert Image.open(out / "m0.png").size == (22, 18)


def test_jpeg_deblur_beats_pinv_and_wiener(tmp_path):
    """A JPEG measurement (quality 90) gets JPEG_SIGMA by default and still beats the classical filters."""
    from deqir_dist.io.images import read_image
    from deqir_dist.io.quantization import JPEG_SIGMA
    x = builtin_bench_images(2, 32)
    op = make_operator("deblur_gauss", (3, 32, 32))
    ys = []
    for k, im in enumerate(op.A(x)):
        a = (((im + 1) / 2).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(a).save(tmp_path / f"y{k}.jpg", quality=90)
        ys.append(read_image(tmp_path / f"y{k}.jpg"))
        assert default_sigma_y(ys[-1][None], tmp_path / f"y{k}.jpg")[0] == JPEG_SIGMA
    yj = torch.stack(ys)
    out = restore(load_builtin(), yj, op, solver="serial", sigma_y=JPEG_SIGMA, generator=_gen()).images
    got = float(psnr(out, x).mean())
    wiener = max(float(psnr(tikhonov_deblur(op, yj, lam).clamp(-1, 1), x).mean()) for lam in TIKHONOV_LAMBDAS)
    assert got > wiener > float(psnr(op.A_pinv(yj).clamp(-1, 1), x).mean())


def test_auto_times_the_padded_size():
    """solver='auto' measures the model on the canvas it will sample on (18x22 -> 20x24)."""
    op = make_operator("inpaint", (3, 18, 22), mask="random")
    res = restore(load_builtin(), op.A(torch.rand(1, 3, 18, 22) * 2 - 1), op, solver="auto", steps=3,
                  generator=_gen())
    assert res.image.shape == (1, 3, 18, 22) and res.solver in ("serial", "picard")


def test_for_noise_threshold_is_relative_to_the_largest_gain():
    """An x4 average has gains <= 1/4 by normalisation: 2 % noise must not make it all null space
    (it did, with an absolute threshold: the sampler then ignored y and gave about 6 dB)."""
    op = make_operator("sr_bicubic", (3, 64, 64), scale=4)
    s = op._buffers["s"]
    assert float(s.max()) < 0.3
    assert op.for_noise(0.02).rank == op.rank
    scaled = op.for_noise(0.2)        # s / s_max <= 16 * 0.2 everywhere: nothing is left to measure
    assert scaled.rank == 0
    blur = make_operator("deblur_gauss", (3, 64, 64))
    keep = int((blur._buffers["s"] > blur.NOISE_KEEP * 0.01 * float(blur._buffers["s"].max())).sum())
    assert blur.for_noise(0.01).rank == keep < blur.rank

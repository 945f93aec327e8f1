import math

import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from deqir_dist.errors import DeqirError
from deqir_dist.quality.metrics import from_unit, psnr, ssim, to_unit


def _pair(kind: str, c: int, h: int, w: int, seed: int = 0):
    """Two (2, C, H, W) float64 batches in [-1, 1]: reference and a degraded version."""
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        x = torch.rand(2, c, h, w, generator=g, dtype=torch.float64) * 2 - 1
    else:  # structured: gradients, a stripe pattern and a disc
        yy, xx = torch.meshgrid(
            torch.linspace(-1, 1, h, dtype=torch.float64),
            torch.linspace(-1, 1, w, dtype=torch.float64),
            indexing="ij",
        )
        chans = [xx, torch.sin(6 * math.pi * yy), ((xx**2 + yy**2) < 0.4).double() * 2 - 1]
        img = torch.stack([chans[i % 3] for i in range(c)])
        x = torch.stack([img, img.flip(-1)]).clamp(-1, 1)
    noise = torch.randn(x.shape, generator=g, dtype=torch.float64) * 0.1
    y = (x + noise).clamp(-1, 1)
    y[1] = torch.roll(y[1], shifts=1, dims=-1)  # second image: also misaligned
    return x, y


CASES = [
    (kind, c, h, w)
    for kind in ("random", "structured")
    for c in (1, 3)
    for h, w in ((32, 32), (48, 64), (11, 17))
]


@pytest.mark.parametrize("kind,c,h,w", CASES)
def test_psnr_matches_skimage(kind, c, h, w):
    x, y = _pair(kind, c, h, w)
    got = psnr(x, y)
    assert got.shape == (2,) and got.dtype == torch.float64
    for i in range(2):
        ref = peak_signal_noise_ratio(x[i].numpy(), y[i].numpy(), data_range=2.0)
        assert abs(got[i].item() - ref) < 1e-4


@pytest.mark.parametrize("kind,c,h,w", CASES)
def test_ssim_matches_skimage(kind, c, h, w):
    x, y = _pair(kind, c, h, w)
    got = ssim(x, y)
    assert got.shape == (2,) and got.dtype == torch.float64
    for i in range(2):
        ref = structural_similarity(      # issue 16: SSIM of [-1, 1] images is taken on [0, 1]
            to_unit(x[i]).numpy(),
            to_unit(y[i]).numpy(),
            data_range=1.0,
            channel_axis=0,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
        )
        assert abs(got[i].item() - ref) < 1e-4


def test_float32_inputs_and_custom_data_range():
    x, y = _pair("random", 3, 32, 32)
    xu, yu = to_unit(x), to_unit(y)
    ref = structural_similarity(
        xu[0].numpy(), yu[0].numpy(), data_range=1.0, channel_axis=0,
        gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    )
    assert abs(ssim(xu.float(), yu.float(), data_range=1.0)[0].item() - ref) < 1e-4
    # PSNR is invariant under the affine [-1,1] -> [0,1] map when data_range follows it.
    torch.testing.assert_close(psnr(xu, yu, data_range=1.0), psnr(x, y))


def test_identical_images():
    x, _ = _pair("structured", 3, 32, 32)
    assert torch.isinf(psnr(x, x)).all() and (psnr(x, x) > 0).all()
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))


def test_unit_helpers_roundtrip():
    x = torch.tensor([-1.0, 0.0, 1.0])
    torch.testing.assert_close(to_unit(x), torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(from_unit(to_unit(x)), x)


@pytest.mark.parametrize("fn", [psnr, ssim])
def test_bad_inputs(fn):
    a = torch.zeros(1, 3, 32, 32)
    with pytest.raises(DeqirError, match="shape mismatch"):
        fn(a, torch.zeros(1, 3, 32, 31))
    with pytest.raises(DeqirError, match=r"\(B, C, H, W\)"):
        fn(a[0], a[0])
    with pytest.raises(DeqirError, match="data_range"):
        fn(a, a, data_range=0.0)


def test_ssim_too_small():
    a = torch.zeros(1, 1, 10, 32)
    with pytest.raises(DeqirError, match="smaller than the 11x11 window"):
        ssim(a, a)
    psnr(a, a)  # fine for PSNR


def test_messages_are_one_line():
    with pytest.raises(DeqirError) as ei:
        ssim(torch.zeros(1, 1, 5, 5), torch.zeros(1, 1, 5, 5))
    assert "\n" not in str(ei.value)
    assert isinstance(ei.value, ValueError)

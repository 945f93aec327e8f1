import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import deqir_dist.io.images as dio
from deqir_dist.errors import DeqirError
from deqir_dist.io.files import ensure_writable_dir
from deqir_dist.io.images import (
    check_finite,
    list_images,
    read_image,
    read_tensor,
    write_image,
    write_tensor,
)

RNG = np.random.default_rng(0)


def unit(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) tensor in [-1, 1] -> (H, W, C) float64 array in [0, 1]."""
    return ((t.double() + 1) / 2).permute(1, 2, 0).numpy()


def over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return rgb * alpha[..., None] + (1 - alpha[..., None])


def mode_of(path) -> str:
    with Image.open(path) as im:
        return im.mode


def files_in(d):
    return sorted(p.name for p in d.iterdir())


def one_line_naming(err: pytest.ExceptionInfo, path) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("bits", [8, 16])
def test_roundtrip(tmp_path, c, bits):
    x = torch.rand(c, 23, 31, dtype=torch.float64) * 2 - 1
    x[:, 0, 0] = -1.0
    x[:, 0, 1] = 1.0
    p = tmp_path / "img.png"
    write_image(p, x, bits=bits)
    y = read_image(p, channels=c)
    assert y.shape == (c, 23, 31) and y.dtype == torch.float32
    assert np.abs(unit(y) - unit(x)).max() <= 1 / (2**bits - 1)
    assert files_in(tmp_path) == ["img.png"]

    with Image.open(p) as im:
        mode = im.mode
        hi = np.asarray(im.convert("RGB") if c == 3 else im)
    codes = np.round(unit(x) * (2**bits - 1)).astype(np.int64)
    if bits == 8:
        assert mode == ("L" if c == 1 else "RGB")
        np.testing.assert_array_equal(hi.reshape(codes.shape), codes)
    elif c == 1:
        assert mode == "I;16"
        np.testing.assert_array_equal(hi.reshape(codes.shape), codes)
    else:  # Pillow only sees the high bytes of a 16-bit RGB PNG
        np.testing.assert_array_equal(hi, codes >> 8)


def test_16bit_keeps_precision(tmp_path):
    codes = np.arange(0, 65536, 257 * 3 + 1, dtype=np.int64)[:48].reshape(1, 4, 12) + 1
    x = torch.from_numpy(codes / 65535 * 2 - 1)
    for c in (1, 3):
        p = tmp_path / f"p{c}.png"
        write_image(p, x.expand(c, -1, -1), bits=16)
        y = read_image(p, channels=c)
        got = np.round(unit(y) * 65535).astype(np.int64)
        np.testing.assert_array_equal(got, np.repeat(codes.transpose(1, 2, 0), c, axis=-1))


def test_write_clamps(tmp_path):
    x = torch.tensor([[[-3.0, -1.0, 0.0, 1.0, 2.5]]])
    write_image(tmp_path / "c.png", x)
    y = read_image(tmp_path / "c.png", channels=1)
    torch.testing.assert_close(y, torch.tensor([[[-1.0, -1.0, 1 / 255, 1.0, 1.0]]]), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- Pillow modes


def test_mode_L_and_channel_conversion(tmp_path):
    a = RNG.integers(0, 256, (9, 7), dtype=np.uint8)
    Image.fromarray(a, "L").save(tmp_path / "l.png")
    g = read_image(tmp_path / "l.png", channels=1)
    np.testing.assert_allclose(unit(g)[..., 0], a / 255, atol=1e-6)
    rgb = read_image(tmp_path / "l.png")
    assert rgb.shape == (3, 9, 7)
    assert torch.equal(rgb[0], rgb[1]) and torch.equal(rgb[1], rgb[2]) and torch.equal(rgb[0], g[0])


def test_mode_RGB_and_luma(tmp_path):
    a = RNG.integers(0, 256, (9, 7, 3), dtype=np.uint8)
    Image.fromarray(a, "RGB").save(tmp_path / "rgb.png")
    np.testing.assert_allclose(unit(read_image(tmp_path / "rgb.png")), a / 255, atol=1e-6)
    luma = (0.299 * a[..., 0] + 0.587 * a[..., 1] + 0.114 * a[..., 2]) / 255
    g = read_image(tmp_path / "rgb.png", channels=1)
    assert g.shape == (1, 9, 7)
    np.testing.assert_allclose(unit(g)[..., 0], luma, atol=1e-6)


def test_mode_RGBA_composited_over_white(tmp_path):
    a = RNG.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    a[0, 0] = [10, 20, 30, 0]  # fully transparent -> white
    a[0, 1] = [10, 20, 30, 255]  # opaque -> colour unchanged
    Image.fromarray(a, "RGBA").save(tmp_path / "rgba.png")
    got = unit(read_image(tmp_path / "rgba.png"))
    np.testing.assert_allclose(got, over_white(a[..., :3] / 255, a[..., 3] / 255), atol=1e-6)
    np.testing.assert_allclose(got[0, 0], [1, 1, 1], atol=1e-6)
    np.testing.assert_allclose(got[0, 1], np.array([10, 20, 30]) / 255, atol=1e-6)


def test_mode_LA_composited_over_white(tmp_path):
    a = RNG.integers(0, 256, (6, 5, 2), dtype=np.uint8)
    a[0, 0] = [0, 0]
    Image.fromarray(a, "LA").save(tmp_path / "la.png")
    got = unit(read_image(tmp_path / "la.png", channels=1))[..., 0]
    np.testing.assert_allclose(got, a[..., 0] / 255 * a[..., 1] / 255 + 1 - a[..., 1] / 255, atol=1e-6)
    assert got[0, 0] == pytest.approx(1.0)


def test_mode_P_palette(tmp_path):
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = RNG.integers(0, 256, (8, 6), dtype=np.uint8)
    im = Image.frombytes("P", (6, 8), idx.tobytes())
    im.putpalette(palette.tobytes())
    im.save(tmp_path / "p.png")
    assert mode_of(tmp_path / "p.png") == "P"
    np.testing.assert_allclose(unit(read_image(tmp_path / "p.png")), palette[idx] / 255, atol=1e-6)

    # A transparent palette entry becomes white.
    t = int(idx[0, 0])
    im.save(tmp_path / "pt.png", transparency=t)
    want = np.where((idx == t)[..., None], 1.0, palette[idx] / 255)
    np.testing.assert_allclose(unit(read_image(tmp_path / "pt.png")), want, atol=1e-6)


def test_colour_key_transparency(tmp_path):
    a = RNG.integers(0, 200, (5, 4, 3), dtype=np.uint8)
    a[1, 1] = [250, 0, 7]
    Image.fromarray(a, "RGB").save(tmp_path / "k.png", transparency=(250, 0, 7))
    got = unit(read_image(tmp_path / "k.png"))
    np.testing.assert_allclose(got[1, 1], [1, 1, 1])
    np.testing.assert_allclose(got[0, 0], a[0, 0] / 255, atol=1e-6)


def test_mode_1(tmp_path):
    a = RNG.integers(0, 2, (7, 9)).astype(bool)
    Image.fromarray(a).convert("1").save(tmp_path / "b.png")
    assert mode_of(tmp_path / "b.png") == "1"
    g = read_image(tmp_path / "b.png", channels=1)
    np.testing.assert_array_equal(g[0].numpy(), np.where(a, 1.0, -1.0))


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_mode_I16(tmp_path, suffix):
    a = RNG.integers(0, 65536, (6, 7), dtype=np.uint16)
    a[0, 0], a[0, 1], a[0, 2] = 0, 1, 65535  # 1/65535 would vanish through 8 bits
    p = tmp_path / f"g16{suffix}"
    Image.fromarray(a).save(p)
    assert mode_of(p).startswith("I;16")
    g = read_image(p, channels=1)
    np.testing.assert_array_equal(np.round(unit(g)[..., 0] * 65535).astype(np.uint16), a)
    assert unit(g)[0, 1, 0] == pytest.approx(1 / 65535, abs=1e-9)


def test_mode_I(tmp_path):
    a = RNG.integers(0, 65536, (5, 6)).astype(np.int32)
    Image.fromarray(a, "I").save(tmp_path / "i.tif")
    assert mode_of(tmp_path / "i.tif") == "I"
    g = read_image(tmp_path / "i.tif", channels=1)
    np.testing.assert_allclose(unit(g)[..., 0], a / 65535, atol=1e-6)

    a[0, 0] = 70000
    Image.fromarray(a, "I").save(tmp_path / "big.tif")
    with pytest.raises(DeqirError, match="16-bit range") as ei:
        read_image(tmp_path / "big.tif")
    one_line_naming(ei, tmp_path / "big.tif")


def test_cmyk_converted_to_rgb(tmp_path):
    Image.new("CMYK", (4, 3), (0, 255, 255, 0)).save(tmp_path / "c.tif")
    np.testing.assert_allclose(unit(read_image(tmp_path / "c.tif"))[0, 0], [1, 0, 0], atol=1e-6)


def test_jpeg(tmp_path):
    yy, xx = np.mgrid[0:32, 0:40]
    a = np.stack([xx * 6, yy * 7, 128 + 0 * xx], -1).astype(np.uint8)
    Image.fromarray(a).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(a[..., 0]).save(tmp_path / "g.JPEG", quality=95)
    rgb = read_image(tmp_path / "a.jpg")
    assert rgb.shape == (3, 32, 40)
    assert np.abs(unit(rgb) - a / 255).mean() < 0.02
    g = read_image(tmp_path / "g.JPEG", channels=1)
    assert g.shape == (1, 32, 40)
    assert np.abs(unit(g)[..., 0] - a[..., 0] / 255).mean() < 0.02


# ----------------------------------------------------------------------------- 16-bit PNG decoder


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _filtered_rows(img: np.ndarray) -> bytes:
    """Encode (h, w, k) uint16 rows, cycling through all five PNG filter types."""
    h, w, k = img.shape
    bpp = 2 * k
    out = bytearray()
    prev = bytes(w * bpp)
    for y in range(h):
        cur = img[y].astype(">u2").tobytes()
        ftype = y % 5
        out.append(ftype)
        for i in range(len(cur)):
            a = cur[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            pred = [0, a, b, (a + b) >> 1, _paeth(a, b, c)][ftype]
            out.append((cur[i] - pred) & 0xFF)
        prev = cur
    return bytes(out)


def chunk(t: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + t + body + struct.pack(">I", zlib.crc32(t + body))


def _png16(img: np.ndarray, color_type: int, interlace: bool = False, trns: bytes | None = None) -> bytes:
    """Independent minimal 16-bit PNG writer (all filter types, optional Adam7) for tests."""
    h, w, _ = img.shape
    if interlace:
        passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
        raw = b"".join(
            _filtered_rows(img[y0::dy, x0::dx]) for x0, y0, dx, dy in passes if x0 < w and y0 < h
        )
    else:
        raw = _filtered_rows(img)

    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, int(interlace))
    comp = zlib.compress(raw)
    idats = chunk(b"IDAT", comp[:10]) + chunk(b"IDAT", comp[10:])  # split IDAT
    extra = chunk(b"tRNS", trns) if trns else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + idats + chunk(b"IEND", b"")


@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize("color_type,k", [(2, 3), (6, 4), (4, 2)])
def test_png16_colour_decoder(tmp_path, color_type, k, interlace):
    img = RNG.integers(0, 65536, (11, 13, k), dtype=np.uint16)
    p = tmp_path / "c16.png"
    p.write_bytes(_png16(img, color_type, interlace))

    # Pillow decodes the same file to 8 bits (gray+alpha as RGBA): validates the test writer.
    with Image.open(p) as im:
        seen = np.asarray(im)
    np.testing.assert_array_equal(seen[..., [0, 3]] if k == 2 else seen, img >> 8)

    f = img / 65535.0
    want = f if k in (1, 3) else over_white(f[..., :-1], f[..., -1])
    got = unit(read_image(p, channels=3 if k >= 3 else 1))
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_png16_rgb_colour_key(tmp_path):
    img = RNG.integers(0, 60000, (4, 5, 3), dtype=np.uint16)
    img[2, 3] = [65000, 1, 300]
    p = tmp_path / "k16.png"
    p.write_bytes(_png16(img, 2, trns=struct.pack(">3H", 65000, 1, 300)))
    got = unit(read_image(p))
    np.testing.assert_allclose(got[2, 3], [1, 1, 1])
    np.testing.assert_allclose(got[0, 0], img[0, 0] / 65535, atol=1e-6)


# ----------------------------------------------------------------------------- bad inputs


def test_truncated_png(tmp_path):
    a = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    for name, write in [
        ("t8.png", lambda p: Image.fromarray(a).save(p)),
        ("t16.png", lambda p: write_image(p, torch.rand(3, 64, 64) * 2 - 1, bits=16)),
    ]:
        p = tmp_path / name
        write(p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])
        with pytest.raises(DeqirError, match="cannot read image") as ei:
            read_image(p)
        one_line_naming(ei, p)


def test_png16_short_image_data(tmp_path):
    p = tmp_path / "short.png"
    ihdr = struct.pack(">IIBBBBB", 4, 4, 16, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 10)
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    with pytest.raises(DeqirError, match="image data is truncated") as ei:
        read_image(p)
    one_line_naming(ei, p)


def test_corrupt_png16_crc(tmp_path):
    p = tmp_path / "crc.png"
    write_image(p, torch.zeros(3, 4, 4), bits=16)
    data = bytearray(p.read_bytes())
    data[40] ^= 0xFF  # inside IDAT
    p.write_bytes(bytes(data))
    with pytest.raises(DeqirError, match="CRC") as ei:
        read_image(p)
    one_line_naming(ei, p)


@pytest.mark.parametrize("content", [b"hello, not an image\n", b"", b"\x89PNG\r\n\x1a\n"])
def test_non_image_file(tmp_path, content):
    p = tmp_path / "fake.png"
    p.write_bytes(content)
    with pytest.raises(DeqirError) as ei:
        read_image(p)
    one_line_naming(ei, p)


def test_missing_and_directory(tmp_path):
    with pytest.raises(DeqirError, match="not found") as ei:
        read_image(tmp_path / "nope.png")
    one_line_naming(ei, tmp_path / "nope.png")
    (tmp_path / "d.png").mkdir()
    with pytest.raises(DeqirError, match="not a regular file"):
        read_image(tmp_path / "d.png")


def test_bad_channels(tmp_path):
    with pytest.raises(DeqirError, match="channels"):
        read_image(tmp_path / "x.png", channels=4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_write_nonfinite(tmp_path, bad):
    x = torch.zeros(3, 4, 4)
    x[1, 2, 3] = bad
    p = tmp_path / "n.png"
    with pytest.raises(DeqirError, match="contains NaN or Inf") as ei:
        write_image(p, x)
    one_line_naming(ei, p)
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(
    "x,kwargs,match",
    [
        (torch.zeros(2, 4, 4), {}, "C in"),
        (torch.zeros(1, 3, 4, 4), {}, "C in"),
        (torch.zeros(3, 0, 4), {}, "C in"),
        (torch.zeros(3, 4, 4), {"bits": 12}, "bits"),
        (np.zeros((3, 4, 4)), {}, "torch.Tensor"),
    ],
)
def test_write_bad_args(tmp_path, x, kwargs, match):
    with pytest.raises(DeqirError, match=match):
        write_image(tmp_path / "b.png", x, **kwargs)
    with pytest.raises(DeqirError, match=r"\.png"):
        write_image(tmp_path / "b.jpg", torch.zeros(3, 4, 4))
    assert files_in(tmp_path) == []


def test_write_unwritable_destination(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    for p in (blocker / "out.png", tmp_path / "missing" / "out.png"):
        with pytest.raises(DeqirError, match="directory") as ei:
            write_image(p, torch.zeros(1, 4, 4))
        one_line_naming(ei, p)
        with pytest.raises(DeqirError):
            write_tensor(p.with_suffix(".pt"), torch.zeros(3))
    (tmp_path / "d.png").mkdir()  # target is a directory: os.replace fails
    with pytest.raises(DeqirError, match="cannot write"):
        write_image(tmp_path / "d.png", torch.zeros(1, 4, 4))
    assert files_in(tmp_path) == ["d.png", "file.txt"]


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user")
def test_write_readonly_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(DeqirError, match="not writable"):
            write_image(ro / "a.png", torch.zeros(1, 4, 4))
        with pytest.raises(DeqirError, match="not writable"):
            ensure_writable_dir(ro)
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------- atomicity


def testatomic_write_failure_in_encoder(tmp_path, monkeypatch):
    p = tmp_path / "a.png"
    write_image(p, torch.zeros(3, 4, 4))
    before = p.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(DeqirError, match="disk full") as ei:
        write_image(p, torch.ones(3, 4, 4))
    one_line_naming(ei, p)
    assert files_in(tmp_path) == ["a.png"]
    assert p.read_bytes() == before


@pytest.mark.parametrize("what", ["image8", "image16", "tensor"])
def testatomic_write_failure_in_replace(tmp_path, monkeypatch, what):
    def broken_replace(src, dst):
        raise OSError("replace failed")

    monkeypatch.setattr(dio.os, "replace", broken_replace)
    with pytest.raises(DeqirError, match="replace failed"):
        if what == "tensor":
            write_tensor(tmp_path / "t.pt", torch.ones(3))
        else:
            write_image(tmp_path / "x.png", torch.ones(3, 4, 4), bits=8 if what == "image8" else 16)
    assert files_in(tmp_path) == []


def testatomic_write_non_oserror_cleans_up(tmp_path, monkeypatch):
    def broken_save(obj, f, *a, **k):
        f.write(b"junk")
        raise RuntimeError("boom")

    monkeypatch.setattr(dio.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="boom"):
        write_tensor(tmp_path / "t.pt", torch.ones(3))
    assert files_in(tmp_path) == []


# ----------------------------------------------------------------------------- tensors


def test_tensor_roundtrip(tmp_path):
    big = torch.randn(100, 50)
    view = big[3:5, ::7]  # a strided view: saved compact
    for i, t in enumerate([torch.randn(2, 3, 4), torch.arange(6, dtype=torch.int64), view]):
        p = tmp_path / f"t{i}.pt"
        write_tensor(p, t)
        got = read_tensor(p)
        assert torch.equal(got, t) and got.dtype == t.dtype
    assert (tmp_path / "t2.pt").stat().st_size < 4 * big.numel()
    assert sorted(files_in(tmp_path)) == ["t0.pt", "t1.pt", "t2.pt"]


def test_tensor_bad_files(tmp_path):
    good = tmp_path / "good.pt"
    write_tensor(good, torch.randn(64, 64))
    cases = {
        "trunc.pt": good.read_bytes()[: good.stat().st_size // 2],
        "junk.pt": RNG.integers(0, 256, 500, dtype=np.uint8).tobytes(),
        "empty.pt": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"a": torch.zeros(2)}, tmp_path / "dict.pt")
    for name in [*cases, "dict.pt"]:
        with pytest.raises(DeqirError) as ei:
            read_tensor(tmp_path / name)
        one_line_naming(ei, tmp_path / name)
    with pytest.raises(DeqirError, match="not found"):
        read_tensor(tmp_path / "missing.pt")
    with pytest.raises(DeqirError, match="torch.Tensor"):
        write_tensor(tmp_path / "x.pt", [1, 2])


def test_check_finite():
    check_finite(torch.zeros(3), "x")
    check_finite(torch.arange(3), "ints")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(DeqirError) as ei:
            check_finite(torch.tensor([0.0, bad]), "measurement y")
        assert str(ei.value) == "measurement y contains NaN or Inf"


# ----------------------------------------------------------------------------- folders


def test_list_images(tmp_path):
    names = ["b.PNG", "a.jpg", "c.jpeg", "d.bmp", "e.tif", "f.TIFF", "g.webp", "notes.txt", ".hidden.png"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "sub.png").mkdir()
    (tmp_path / "sub.png" / "inner.png").write_bytes(b"")
    got = list_images(tmp_path)
    assert [p.name for p in got] == ["a.jpg", "b.PNG", "c.jpeg", "d.bmp", "e.tif", "f.TIFF", "g.webp"]
    assert all(p.parent == tmp_path for p in got)
    assert list_images(tmp_path / "sub.png") == [tmp_path / "sub.png" / "inner.png"]

    with pytest.raises(DeqirError) as ei:
        list_images(tmp_path / "missing")
    one_line_naming(ei, tmp_path / "missing")
    with pytest.raises(DeqirError):
        list_images(tmp_path / "a.jpg")


def test_ensure_writable_dir(tmp_path):
    d = ensure_writable_dir(str(tmp_path / "x" / "y"))
    assert d == tmp_path / "x" / "y" and d.is_dir() and files_in(d) == []
    assert ensure_writable_dir(d) == d  # existing is fine

    f = tmp_path / "f"
    f.write_text("x")
    for bad in (f, f / "sub"):
        with pytest.raises(DeqirError) as ei:
            ensure_writable_dir(bad)
        one_line_naming(ei, bad)
